"""``compilefuse.fold``: the folded model as a plain module, exact against float64, holding no more
tensors than the model's own hand re-parameterisation, and working wherever a module goes."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import float64_reference, randomize_bn, relative_error
from torch import nn

import compilefuse
from compilefuse.examples import branchy
from compilefuse.examples.models import SmallCNN


def tensors(module: nn.Module) -> int:
    return len(list(module.parameters())) + len(list(module.buffers()))


@pytest.fixture(scope="module")
def repvgg():
    """One RepVGG-style model, folded once for the tests that only read it."""
    torch.manual_seed(0)
    model = randomize_bn(branchy.repvgg_style()).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, compilefuse.fold(model, (x,))


@pytest.mark.parametrize("factory", [branchy.repvgg_style, branchy.mobileone_style, branchy.fastvit_style])
def test_folded_module_is_exact_and_holds_no_more_tensors_than_the_hand_deploy_step(factory):
    model = randomize_bn(factory()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    folded = compilefuse.fold(model, (x,))
    assert relative_error(folded(x), float64_reference(model, x)) < 1e-5
    assert tensors(folded) < tensors(model)
    if hasattr(model, "reparameterize"):  # the built-in fastvit_style has no hand deploy step
        assert tensors(folded) <= tensors(copy.deepcopy(model).reparameterize())
    assert folded.report.folded == folded.report.total > 0 and folded.report.merges
    for name, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[name]), name


def test_names_are_the_users_modules_and_blocks():
    model = randomize_bn(SmallCNN()).eval()
    folded = compilefuse.fold(model, (torch.randn(1, 3, 16, 16),))
    folded_names = {name for name, _ in folded.named_parameters()}
    # every conv keeps its module's name; the BNs folded into them are gone
    convs = {f"{name}.{role}" for name, m in model.named_modules() if isinstance(m, nn.Conv2d) for role in ("weight", "bias")}
    assert convs <= folded_names
    folded_bns = {row.bn for row in folded.report.rows if row.folded}
    assert folded_bns and not any(n.startswith(bn + ".") for bn in folded_bns for n in folded_names)
    assert "skip_bn.weight" in folded_names  # kept (no producer), so still read


def test_merged_conv_is_named_after_its_block(repvgg):
    model, _, folded = repvgg
    blocks = {name for name, m in model.named_modules() if isinstance(m, branchy.RepBlock)}
    assert {f"{block}.weight" for block in blocks} <= {name for name, _ in folded.named_parameters()}


def test_runs_under_torch_compile_with_any_backend(repvgg):
    model, x, folded = repvgg
    reference = float64_reference(model, x)
    for backend in ("inductor", "bnfuse"):
        torch._dynamo.reset()
        with torch.inference_mode():
            assert relative_error(torch.compile(folded, backend=backend)(x), reference) < 1e-5, backend


def test_exports_again_and_survives_save_load_and_state_dict(repvgg):
    model, x, folded = repvgg
    reference = float64_reference(model, x)
    assert relative_error(torch.export.export(folded, (x,)).module()(x), reference) < 1e-5
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert relative_error(loaded(x), reference) < 1e-5
    for module in (folded, loaded):  # the size check is part of its code, and survives a reload
        with pytest.raises(ValueError, match="folded for"):
            module(torch.randn(3, 3, 32, 32))
    other = compilefuse.fold(randomize_bn(branchy.repvgg_style()).eval(), (x,))
    other.load_state_dict(folded.state_dict())
    assert relative_error(other(x), reference) < 1e-5


def test_dynamic_batch_as_in_export():
    model = randomize_bn(SmallCNN()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    folded = compilefuse.fold(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: batch}})
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16)
        assert relative_error(folded(x), float64_reference(model, x)) < 1e-5
    with pytest.raises(ValueError, match="folded for"):
        folded(torch.randn(2, 3, 17, 16))


def test_training_mode_bn_is_an_error_that_says_fold_is_for_inference():
    model = SmallCNN().train()
    with pytest.raises(ValueError, match=r"for inference.*training mode"):
        compilefuse.fold(model, (torch.randn(1, 3, 16, 16),))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y if y.sum().item() > 0 else -y  # data-dependent: torch.export cannot trace it


def test_a_model_that_does_not_export_names_the_module():
    with pytest.raises(compilefuse.ExportError, match=r"compilefuse.fold: .*Branching"):
        compilefuse.fold(Branching().eval(), (torch.randn(1, 3, 8, 8),))


def test_exports_to_onnx_and_runs_in_onnx_runtime(repvgg, tmp_path):
    import onnx
    import onnxruntime

    model, x, folded = repvgg
    path = str(tmp_path / "folded.onnx")
    torch.onnx.export(folded, (x,), path, dynamo=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert relative_error(torch.from_numpy(out), float64_reference(model, x)) < 1e-5
    # the merged convs are what ONNX Runtime gets: one Conv per block, no BatchNormalization
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == len(list(model.blocks))


def test_is_an_input_of_pt2e_quantization(repvgg):
    """X86InductorQuantizer annotates ``conv2d`` and ``linear``: every weight of the folded module
    is quantized, one per merged block, and the int8 model stays near the float one."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    model, x, folded = repvgg
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(folded, (x,)).module(), quantizer)
    for _ in range(4):
        prepared(torch.randn_like(x))
    quantized = convert_pt2e(prepared)
    quantized_weights = quantized.graph.find_nodes(
        op="call_function", target=torch.ops.quantized_decomposed.dequantize_per_channel.default)
    assert len(quantized_weights) == len(list(model.blocks)) + 1  # the blocks' convs and the head
    with torch.no_grad():
        assert relative_error(quantized(x), float64_reference(model, x)) < 0.25


class SharedActivationInput(nn.Module):
    """A conv's output read by an activation and by an add: the activation must not overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.bn2(self.conv2(torch.relu(y)))
        return torch.sigmoid(z) + y


def test_activations_overwrite_only_what_nothing_else_reads():
    model = randomize_bn(SharedActivationInput()).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = compilefuse.fold(model, (x,))
    targets = [node.target for node in folded.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.relu.default in targets and torch.ops.aten.sigmoid_.default in targets
    assert torch.ops.aten.conv2d.default in targets and torch.ops.aten.convolution.default not in targets
    assert relative_error(folded(x), float64_reference(model, x)) < 1e-5
