"""Weights as data (issue 30), measured before choosing a design: what a folded graph costs per call
when its folded weights are graph *inputs* (compiled without freezing, so a weight change needs a
refit, not a recompile), against bnfuse's frozen graph, plain Inductor and Inductor's freezing;
and what a refit itself would cost (the float64 folds of every conv + BN, and oneDNN packing).

    python benchmarks/weights_as_data.py [--models resnet18,mobilenet_v3_large] [--batch 1] [--json OUT]

Systems, interleaved in one process, 2 threads, medians of rounds:
- ``inductor``: plain Inductor, weights as inputs, BN unfolded;
- ``inductor_freezing``: Inductor with ``freezing=True`` (constants, oneDNN packing, its own folding);
- ``bnfuse``: today's backend (freezing + bnfuse's folds);
- ``folded_as_inputs``: ``compilefuse.fold``'s module (the same folds, done ahead) compiled by plain
  Inductor: the folded weights are graph inputs, nothing is packed. The JIT path with a fold
  prologue would compile the same graph.
- ``aoti_runtime_folding``: bnfuse's per-step graph (each fold float64 arithmetic on the raw weights,
  in the graph; captured from a training-mode compile) exported with the raw weights as constants
  and built by AOTInductor with ``aot_inductor.use_runtime_constant_folding``: AOTInductor runs the
  fold arithmetic once per constant update, so a refit is ``load_constants`` of the new raw weights.
  Its refit is timed and checked against float64 with another instance's weights.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time

import _results  # benchmarks/_results.py (the script's folder is on sys.path)
import torch
import torchvision
from torch import nn
from torch.utils.benchmark import Timer

import compilefuse
from compilefuse import fold_math
from compilefuse._torch_private import aoti, inductor
from compilefuse.examples.models import randomize_bn
from compilefuse.examples.reference import float64_reference, relative_error

THREADS = 2


def systems(model: nn.Module, x: torch.Tensor, runtime_folding: list[object]) -> dict[str, tuple[object, float]]:
    """Each system compiled and called once: (callable, seconds to its first answer). The AOTInductor
    package's loaded model is appended to ``runtime_folding``."""
    folded = compilefuse.fold(model, (x,))
    builders = {
        "inductor": lambda: torch.compile(model),
        "inductor_freezing": lambda: torch.compile(model, options={"freezing": True}),
        "bnfuse": lambda: torch.compile(model, backend="bnfuse"),
        "folded_as_inputs": lambda: torch.compile(folded),
    }
    builders["aoti_runtime_folding"] = lambda: aoti_runtime_folding(model, x, runtime_folding)
    built = {}
    for name, build in builders.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = build()
        with torch.inference_mode():
            compiled(x)
        built[name] = (compiled, time.perf_counter() - start)
    return built


def per_step_graph(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list[object]]:
    """bnfuse's per-step graph of ``model`` (folds as float64 arithmetic on the raw weights) and its
    inputs, captured from a compile with grad enabled. (An experiment: it wraps a private function.)"""
    captured: list[tuple[torch.fx.GraphModule, list[object]]] = []
    compile_with_inductor = inductor.compile_with_inductor

    def capture(gm, inputs, patches, *, keep_bn):
        captured.append((gm, list(inputs)))
        return compile_with_inductor(gm, inputs, patches, keep_bn=keep_bn)

    inductor.compile_with_inductor = capture
    try:
        torch._dynamo.reset()
        torch.compile(model, backend="bnfuse")(x)
    finally:
        inductor.compile_with_inductor = compile_with_inductor
    (gm, inputs), = captured
    return gm, inputs


class _Weights(nn.Module):
    pass


def runtime_folding_module(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """The per-step graph with the model's parameters and buffers as attributes named by their
    state-dict keys (dots as ``__``), the data input the only placeholder."""
    gm, inputs = per_step_graph(model, x)
    names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
    root, graph, env = _Weights(), torch.fx.Graph(), {}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = inputs[placeholders.index(node)]
            if id(value) in names:
                attribute = names[id(value)].replace(".", "__")
                root.register_buffer(attribute, value.detach())
                env[node] = graph.get_attr(attribute)
            else:
                env[node] = graph.placeholder(node.name)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            env[node].meta = {}
    return torch.fx.GraphModule(root, graph)


def aoti_runtime_folding(model: nn.Module, x: torch.Tensor, loaded_models: list[object]) -> object:
    module = runtime_folding_module(model, x)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        files = aoti.aoti_compile(aoti.unlifted_module(program), (x,), {},
                                            {"aot_inductor.use_runtime_constant_folding": True})
    path = os.path.join(tempfile.mkdtemp(), "runtime_folding.pt2")
    aoti.write_package(path, files, {})
    loaded = torch._inductor.aoti_load_package(path)
    loaded_models.append(loaded)
    return lambda x: loaded(x)[0]


def refit_check(name: str, loaded: object, x: torch.Tensor) -> dict[str, float]:
    """``load_constants`` of another instance's raw weights: seconds, and the answer against float64."""
    torch.manual_seed(1)
    other = randomize_bn(getattr(torchvision.models, name)().eval())
    weights = {n.replace(".", "__"): t.detach() for n, t in (*other.named_parameters(), *other.named_buffers())}
    wanted = loaded.get_constant_fqns()
    start = time.perf_counter()
    loaded.load_constants({k: weights[k] for k in wanted if k in weights}, check_full_update=False)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        out = loaded(x)[0]
    return {"refit_s": seconds, "error_vs_float64": relative_error(out, float64_reference(other, x))}


def refit_seconds(model: nn.Module) -> dict[str, float]:
    """The float64 folds of every conv directly followed by its BN (``nn.Sequential`` order is the
    modules' registration order in torchvision's models), rounded once, and oneDNN's packing of the
    folded conv weights: what a refit would compute."""
    modules = list(model.modules())
    pairs = [(a, b) for a, b in itertools.pairwise(modules)
             if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]

    def fold() -> list[torch.Tensor]:
        out = []
        for conv, bn in pairs:
            scale, shift = fold_math.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            out.append(fold_math.scale_output_channels(conv.weight, scale).to(conv.weight.dtype))
            out.append(fold_math.fold_bias(conv.bias, scale, shift).to(conv.weight.dtype))
        return out

    def pack(weights: list[torch.Tensor]) -> None:
        for (conv, _), weight in zip(pairs, weights[::2], strict=True):
            torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups)

    with torch.no_grad():
        weights = fold()
        fold_s = Timer("fold()", globals={"fold": fold}, num_threads=THREADS).blocked_autorange(min_run_time=1).median
        pack_s = Timer("pack(w)", globals={"pack": pack, "w": weights},
                       num_threads=THREADS).blocked_autorange(min_run_time=1).median
    return {"folds": len(pairs), "fold_ms": fold_s * 1e3, "pack_ms": pack_s * 1e3}


def packed_weight_as_graph_input() -> dict[str, float]:
    """Whether Inductor compiles a graph that takes a oneDNN-packed conv weight as an *input* (as a
    refit that packs would hand it), and that conv's time against the same conv on a plain weight:
    a 64-channel 3x3 conv + ReLU at 56x56, batch 1."""
    w, b, x = torch.randn(64, 64, 3, 3), torch.randn(64), torch.randn(1, 64, 56, 56)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))

    def on_packed(x, packed, b):
        return torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")

    def on_plain(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, 1, 1).relu()

    packed_call, plain_call = torch.compile(on_packed, fullgraph=True), torch.compile(on_plain, fullgraph=True)
    with torch.inference_mode():
        error = float((packed_call(x, packed, b) - on_plain(x, w, b)).abs().max())
        times = {name: Timer("f(x, a, b)", globals={"f": f, "x": x, "a": a, "b": b},
                             num_threads=THREADS).blocked_autorange(min_run_time=1).median * 1e3
                 for name, f, a in (("packed_input_ms", packed_call, packed), ("plain_weight_ms", plain_call, w))}
    return {"max_abs_difference": error, **times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,mobilenet_v3_large,efficientnet_b0")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    result = {"threads": THREADS, "batch": args.batch, "size": args.size, "torch": torch.__version__,
              "packed_weight_as_graph_input": packed_weight_as_graph_input(), "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = randomize_bn(getattr(torchvision.models, name)().eval())
        x = torch.randn(args.batch, 3, args.size, args.size)
        runtime_folding: list[object] = []
        built = systems(model, x, runtime_folding)
        times: dict[str, list[float]] = {system: [] for system in built}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for system, (compiled, _) in built.items():
                    timer = Timer("f(x)", globals={"f": compiled, "x": x}, num_threads=THREADS)
                    times[system].append(timer.blocked_autorange(min_run_time=1).median * 1e3)
        medians = {system: statistics.median(values) for system, values in times.items()}
        result["models"][name] = {
            "ms": medians,
            "vs_bnfuse": {system: medians[system] / medians["bnfuse"] for system in medians},
            "first_answer_s": {system: seconds for system, (_, seconds) in built.items()},
            "refit": refit_seconds(model),
            "aoti_runtime_folding_refit": refit_check(name, runtime_folding[0], x),
        }
    _results.emit(result, args.json)


if __name__ == "__main__":
    main()
