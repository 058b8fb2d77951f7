"""A bounded load test of a Ray Serve fleet on loopback (issue 23), and a rolling update under load.

    python benchmarks/ray_serve_load.py [--model resnet18] [--requests 300] [--seconds 90] [--json OUT]

resnet18 at batch 1, 224 px, served by ``compilefuse.ray_serve.application`` on 127.0.0.1: a
``compilefuse.export`` package and the eager model (``torch.save``\\ d), each as 2 replicas x 1
thread and as 1 replica x 2 threads. For each: ``--clients`` concurrent clients send until
``--requests`` answers or ``--seconds`` have passed; throughput, p50 and p99 latency, the median
time of the model call inside the replica (the rest is Ray, HTTP and the clients, all on the same
cores), and every answer checked against the same file's answer in this process at the replica's
thread count.
Then a rolling update from one package to another (other weights) under the same load: failed
requests, wrong answers, and how long the update took. Ray is started with as many logical CPUs
as the machine has, plus two for the update's overlap; usage statistics off.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time

import torch
import torchvision

import compilefuse
from compilefuse.ray_serve import application, ask, file_digest, load_model


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_answer(path: str, x: torch.Tensor, threads: int) -> torch.Tensor:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return load_model(path)(x)
    finally:
        torch.set_num_threads(previous)


def load(url: str, x: torch.Tensor, clients: int, requests: int, seconds: float, during=None) -> dict:
    """``clients`` threads asking until ``requests`` answers or ``seconds``; ``during`` runs in
    this thread meanwhile (the rolling update), and the load ends when it has returned too."""
    answers: list[tuple[float, str, torch.Tensor]] = []
    failures: list[str] = []
    compute_ms: list[float] = []
    stop, lock = threading.Event(), threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if len(answers) + len(failures) >= requests:
                    return
            start = time.perf_counter()
            try:
                y, digest = ask(url, x, timeout=60, compute_ms=compute_ms)
            except Exception as error:  # noqa: BLE001 - counted
                with lock:
                    failures.append(repr(error))
                continue
            with lock:
                answers.append((time.perf_counter() - start, digest, y))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    extra = during() if during is not None else None
    if during is not None:
        stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies = sorted(a[0] * 1e3 for a in answers)
    return {"answers": answers, "failures": failures, "elapsed_s": elapsed, "extra": extra,
            "throughput_per_s": len(answers) / elapsed,
            "p50_ms": statistics.median(latencies) if latencies else None,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
            "replica_compute_p50_ms": statistics.median(compute_ms) if compute_ms else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    rows, result = [], {"model": args.model, "torch": torch.__version__, "ray": ray.__version__, "clients": args.clients}
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = getattr(torchvision.models, args.model)().eval()
            files[f"package{seed}"] = os.path.join(folder, f"{args.model}{seed}.pt2")
            compilefuse.export(model, (x,), files[f"package{seed}"])
            if seed == 0:
                files["eager"] = os.path.join(folder, f"{args.model}.pt")
                torch.save(model, files["eager"])
        ray.init(num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False)
        port = free_loopback_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/model"
        try:
            for kind in ("package0", "eager"):
                for replicas, threads in ((2, 1), (1, 2)):
                    serve.run(application(files[kind], replicas=replicas, threads=threads), name="model", route_prefix="/model")
                    for _ in range(5):
                        ask(url, x)
                    expected = {file_digest(files[kind]): expected_answer(files[kind], x, threads)}
                    run = load(url, x, args.clients, args.requests, args.seconds)
                    wrong = sum(not torch.equal(y, expected.get(d, torch.empty(0))) for _, d, y in run["answers"])
                    rows.append({"system": "package" if kind.startswith("package") else "eager",
                                 "replicas x threads": f"{replicas} x {threads}", "answers": len(run["answers"]),
                                 "failed": len(run["failures"]), "wrong": wrong, "throughput_per_s": run["throughput_per_s"],
                                 "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"],
                                 "replica_compute_p50_ms": run["replica_compute_p50_ms"]})
                    print(json.dumps(rows[-1]), flush=True)
            # the rolling update: package0 -> package1, 2 x 1, under load
            serve.run(application(files["package0"], replicas=2, threads=1), name="model", route_prefix="/model")
            expected = {file_digest(files[k]): expected_answer(files[k], x, 1) for k in ("package0", "package1")}

            def update() -> float:
                time.sleep(2)
                start = time.perf_counter()
                serve.run(application(files["package1"], replicas=2, threads=1), name="model", route_prefix="/model")
                took = time.perf_counter() - start
                time.sleep(3)  # answers from the new package only, for a while
                return took

            run = load(url, x, args.clients, 10**6, args.seconds, during=update)
            digests = [d for _, d, _ in run["answers"]]
            result["rolling_update"] = {
                "answers": len(digests), "failed": len(run["failures"]), "failures": run["failures"][:5],
                "wrong": sum(not torch.equal(y, expected.get(d, torch.empty(0))) for _, d, y in run["answers"]),
                "old answers": digests.count(file_digest(files["package0"])),
                "new answers": digests.count(file_digest(files["package1"])),
                "update_s": run["extra"], "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"]}
            print(json.dumps(result["rolling_update"]), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
