"""Cold start: process start to first result in a fresh process, per system.

What a replica that starts pays: interpreter and ``import torch``, compiling (or loading the
package, or building the ONNX Runtime session), and the first call. Building the model itself is
the user's own cost, the same for every system, and a server loading a package does not pay it:
it is timed in the child and left out. Compile caches are warm: each system's child runs once
before the measured run (Inductor's on-disk caches; a package is built once, beforehand).

Run as ``python -m compilefuse.bench.cold_start REQUEST_JSON``: the child prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from . import fresh_process

#: The systems whose replica loads a package: a cold start is the load, not the build (a tuned
#: package loads as an untuned one does).
PACKAGED = ("export", "export+tune")


def measure(model: str, system: str, batch: int, *, device: str, dtype: str, threads: int, image_size: int,
            mode: str | None, dynamic: bool, timeout: float = 900.0) -> float:
    """Seconds from starting a fresh process to its first result, caches warm."""
    request = {"model": model, "system": system, "batch": batch, "device": device, "dtype": dtype,
               "threads": threads, "image_size": image_size, "mode": mode, "dynamic": dynamic}
    with tempfile.TemporaryDirectory() as folder:
        if system in PACKAGED:
            request["package"] = os.path.join(folder, "model.pt2")
            _child({**request, "build_package": True}, timeout)
        _child(request, timeout)  # warms the compile caches (and the page cache)
        start = time.time()
        result = _child(request, timeout)
    return result["answered_at"] - start - result["model_build_s"]


def _child(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        done = fresh_process.run_module("compilefuse.bench.cold_start", json.dumps(request), timeout=timeout)
    except fresh_process.ChildFailed as error:
        raise RuntimeError(f"cold-start child failed: {error}") from None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(request: dict[str, Any]) -> dict[str, Any]:
    import torch

    from . import catalog
    from .systems import DTYPES, SYSTEMS, CompileSettings

    torch.set_num_threads(request["threads"])
    dtype, device = DTYPES[request["dtype"]], torch.device(request["device"])
    start = time.perf_counter()
    spec = catalog.resolve(request["model"], request["image_size"])
    example = spec.make_input(request["batch"]).to(device=device, dtype=dtype)
    model = None if request["system"] in PACKAGED and not request.get("build_package") else spec.build()
    if model is not None:
        model = model.to(device=device, dtype=dtype)
    build_s = time.perf_counter() - start
    settings = CompileSettings(mode=request["mode"], dynamic=True if request["dynamic"] else None, threads=request["threads"])
    if request["system"] in PACKAGED:
        from ..aot import exporting
        from ..runtime import loading

        if request.get("build_package"):
            exporting.export(model, (example,), request["package"])
            return {"answered_at": time.time(), "model_build_s": build_s}
        run = loading.load(request["package"])
    else:
        run = SYSTEMS[request["system"]].prepare(model, example, settings)
    system = SYSTEMS[request["system"]]
    with torch.inference_mode(), system.call_context():
        run(example)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"answered_at": time.time(), "model_build_s": build_s}


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.argv[1]))))
