"""A fleet on Ray Serve (``compilefuse.ray_serve``), started locally on loopback: two replicas of
a package answer exactly what the package answers in this process, and a rolling update to a new
package under requests fails none and answers none wrongly. Every loop is bounded in count and
time; Ray is shut down at the end."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
from helpers import randomize_bn

import compilefuse
from compilefuse.examples.models import SmallCNN

pytestmark = pytest.mark.slow


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_on_loopback():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield serve, f"http://127.0.0.1:{port}/model"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_replicas_answer_exactly_and_a_rolling_update_fails_no_request(serve_on_loopback, tmp_path):
    from compilefuse.ray_serve import application, ask, file_digest

    serve, url = serve_on_loopback
    x = torch.randn(1, 3, 16, 16)
    expected = {}
    for seed in (0, 1):  # two packages of the same model with different weights
        torch.manual_seed(seed)
        path = tmp_path / f"model{seed}.pt2"
        compilefuse.export(randomize_bn(SmallCNN()).eval(), (x,), path)
        torch.set_num_threads(1)  # as each replica runs it
        try:
            expected[file_digest(str(path))] = compilefuse.load(path)(x)
        finally:
            torch.set_num_threads(2)
    old, new = (str(tmp_path / f"model{seed}.pt2") for seed in (0, 1))
    old_digest, new_digest = file_digest(old), file_digest(new)

    serve.run(application(old, replicas=2, threads=1), name="model", route_prefix="/model")
    for _ in range(6):
        y, digest = ask(url, x)
        assert digest == old_digest and torch.equal(y, expected[digest])

    answers, failures, stop = [], [], threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 2000:
            try:
                answers.append(ask(url, x))
            except Exception as error:  # noqa: BLE001 - counted, and the test fails on any
                failures.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    serve.run(application(new, replicas=2, threads=1), name="model", route_prefix="/model")  # returns when rolled
    seen_new = time.monotonic() + 30
    while time.monotonic() < seen_new and not any(d == new_digest for _, d in answers[-5:]):
        time.sleep(0.2)
    stop.set()
    for thread in clients:
        thread.join(timeout=60)
    assert not failures, failures[:3]
    assert answers and all(torch.equal(y, expected[d]) for y, d in answers)
    assert answers[-1][1] == new_digest
