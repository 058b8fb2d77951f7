"""A fleet on Ray Serve: every replica loads one model file (a ``compilefuse.export`` package, or a
``torch.save``\\ d module for eager serving) with its thread count set, and answers HTTP requests
whose body is a ``torch.save``\\ d input tensor with the ``torch.save``\\ d output.

    from ray import serve
    from compilefuse.ray_serve import application
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(application("model.pt2", replicas=2, threads=1), name="model")

Ray gives each replica process ``OMP_NUM_THREADS=1`` unless told otherwise: here the thread count
is set in the replica's environment and with ``torch.set_num_threads``, and each replica reserves
that many CPUs. Each answer names the file that computed it (``x-compilefuse-model``: its
SHA-256, first 16 hex digits), so a client can check answers during a rolling update, which is
``serve.run`` again with a new file: Ray starts the new replicas, then drains the old ones.

Needs ``ray[serve]`` (the ``serve`` extra). Importing this module does not start Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import os
import time
import urllib.request
from typing import Any

import torch
from ray import serve

from .runtime.heap import reuse_freed_memory
from .runtime.loading import load

MODEL_HEADER = "x-compilefuse-model"
#: How long the replica's model call took (ms): the rest of a request's latency is Ray and HTTP.
COMPUTE_HEADER = "x-compilefuse-compute-ms"


def file_digest(path: str) -> str:
    """The name an answer carries: the first 16 hex digits of the model file's SHA-256."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def load_model(path: str) -> Any:
    """A package through ``compilefuse.load`` (its input check on); otherwise a ``torch.save``\\ d
    module, put in eval mode."""
    if path.endswith(".pt2"):
        return load(path)
    return torch.load(path, weights_only=False).eval()


@serve.deployment(max_ongoing_requests=4, graceful_shutdown_timeout_s=30)
class ModelReplica:
    """One replica: the model of ``path``, run with ``threads`` threads under inference mode, in a
    process whose freed memory is kept for the next call (``heap.reuse_freed_memory``: a replica
    serves one model, and its large tensors then cost no page faults)."""

    def __init__(self, path: str, threads: int) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        reuse_freed_memory()
        self.model, self.digest = load_model(path), file_digest(path)
        # One model call at a time, off the event loop: the replica keeps reading the next request
        # and answering Ray's health checks while it computes, and never oversubscribes its threads.
        self._compute = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _answer(self, body: bytes) -> tuple[bytes, float]:
        x = torch.load(io.BytesIO(body), weights_only=True)
        start = time.perf_counter()
        with torch.inference_mode():
            y = self.model(x)
        compute_ms = (time.perf_counter() - start) * 1e3
        out = io.BytesIO()
        torch.save(y, out)
        return out.getvalue(), compute_ms

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await request.body()
        answer, compute_ms = await asyncio.get_running_loop().run_in_executor(self._compute, self._answer, body)
        headers = {MODEL_HEADER: self.digest, COMPUTE_HEADER: f"{compute_ms:.3f}"}
        return Response(answer, media_type="application/octet-stream", headers=headers)


def application(path: str | os.PathLike[str], *, replicas: int = 1, threads: int = 1) -> Any:
    """The Serve application of ``replicas`` replicas of the model at ``path``, ``threads`` each."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compilefuse.ray_serve: no model file at {path!r}")
    options = {"num_cpus": threads, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}
    return ModelReplica.options(num_replicas=replicas, ray_actor_options=options).bind(path, threads)


def ask(url: str, x: torch.Tensor, timeout: float = 30.0, *, compute_ms: list[float] | None = None) -> tuple[torch.Tensor, str]:
    """One request to a replica set served by ``application``: the answer, and the digest of the
    model file that computed it (the replica's compute time appended to ``compute_ms``, if given)."""
    body = io.BytesIO()
    torch.save(x, body)
    request = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                     headers={"content-type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if compute_ms is not None:
            compute_ms.append(float(response.headers[COMPUTE_HEADER]))
        return torch.load(io.BytesIO(response.read()), weights_only=True), response.headers[MODEL_HEADER]
