"""Which step of loading a CUDA AOTInductor package crashes on this torch? Each variant builds and
loads SmallCNN in a process of its own, so a segfault ends only that variant: torch's own
``aoti_compile_and_package``, compilefuse's build without its extra files, without freezing, as
shipped (dynamic and static batch), and the same on CPU as a control.

Usage on a GPU machine: ``python3 benchmarks/aoti_cuda_load_check.py`` (about a minute per variant).
"""

from __future__ import annotations

import faulthandler
import subprocess
import sys

VARIANTS = ["torch_own", "no_extra_files", "no_freezing", "shipped", "shipped_static", "shipped_cpu"]


def main() -> None:
    for variant in VARIANTS:
        result = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, timeout=300)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "warn" not in line.lower()]
        print(f"=== {variant}: exit {result.returncode}", *lines[-12:], sep="\n", flush=True)


def run(variant: str) -> None:
    import torch
    from torch.export.pt2_archive import _package

    import compilefuse
    from compilefuse._torch_private import aoti
    from compilefuse.aot import exporting, package
    from compilefuse.config import BnfuseConfig
    from compilefuse.examples.models import SmallCNN, randomize_bn

    faulthandler.enable()
    device = "cpu" if variant == "shipped_cpu" else "cuda"
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    dynamic = None if variant == "shipped_static" else ({0: torch.export.Dim("batch", min=1, max=32)},)
    path = f"/tmp/aoti_check_{variant}.pt2"
    with torch.no_grad():
        if variant == "torch_own":
            torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,), dynamic_shapes=dynamic), package_path=path)
        elif variant in ("no_extra_files", "no_freezing"):
            gm, _ = package.fold_program(exporting.trace_for_export(model, (x,), dynamic), BnfuseConfig.from_options(None).rules)
            files = aoti.aoti_compile(gm, (x,), {}, {"freezing": variant == "no_extra_files"})
            _package.package_pt2(path, aoti_files=files)
        else:
            compilefuse.export(model, (x,), path, dynamic_shapes=dynamic)
        print("built", flush=True)
        loaded = torch._inductor.aoti_load_package(path)
        print("loaded", flush=True)
        print("max abs error", (loaded(x) - model(x)).abs().max().item(), flush=True)


if __name__ == "__main__":
    run(sys.argv[1]) if len(sys.argv) > 1 else main()
