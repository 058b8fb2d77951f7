"""What ONNX Runtime's spinning threads cost the torch calls beside them in one process (issue 23).

    python benchmarks/ort_spinning.py [--model resnet18] [--pairs 200] [--json OUT]

resnet18 at batch 1, 224 px, 2 threads for torch and ORT alike. For ORT sessions with spinning on
(ORT's default, ``session.intra_op.allow_spinning=1``) and off: the median time of one eager torch
call alone, one ORT run alone, and one eager call that directly follows an ORT run (what the
benchmark's interleaving does). The bench runs ORT with spinning off (``bench/systems.py``).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import _results  # benchmarks/_results.py (the script's folder is on sys.path)
import numpy
import onnxruntime
import torch
import torchvision


def session(model: torch.nn.Module, x: torch.Tensor, threads: int, spinning: bool) -> onnxruntime.InferenceSession:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buffer, input_names=["input"], dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(1, 3, 224, 224)
    feed = {"input": x.numpy()}
    result = {"model": args.model, "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    with torch.inference_mode():
        for spinning in (True, False, True, False):  # twice each, alternating: the VM drifts
            ort = session(model, x, args.threads, spinning)
            for _ in range(10):
                ort.run(None, feed), model(x)
            eager_after_ort = []
            for _ in range(args.pairs):
                ort.run(None, feed)
                start = time.perf_counter()
                model(x)
                eager_after_ort.append((time.perf_counter() - start) * 1e3)
            row = {"eager alone ms": median_ms(lambda: model(x), args.pairs),
                   "ort alone ms": median_ms(lambda ort=ort: ort.run(None, feed), args.pairs),
                   "eager right after an ORT run ms": statistics.median(eager_after_ort)}
            result.setdefault("spinning on" if spinning else "spinning off", []).append(row)
            del ort
    _results.emit(result, args.json)


if __name__ == "__main__":
    numpy.random.seed(0)
    main()
