"""Two OpenVINO settings behind tinysaver's OpenVINO stages, each against the alternative, in one run.

    python benchmarks/bench_openvino.py --zoo fashion-mnist

1. **Fixed shapes.** Per model and batch size: ms per batch on the dynamic-batch compiled model
   and on one compiled for that fixed shape (``Runner.expect_batch``), interleaved, medians; the
   compile time of each, and the largest difference between their logits.
2. **Pinning.** Two compiled copies of ``--pair-model`` on 1 thread each, called from two Python
   threads at once (what a pipelined cascade does with saver and base), with OpenVINO's CPU pinning
   on (its default here) and off (tinysaver's setting): ms per call, against one copy called alone.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import openvino as ov

from tinysaver.runtimes import make_runner
from tinysaver.zoo import load_zoo
from common import parser, table_head


def median_ms(fn, x, calls: int) -> float:
    fn(x)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def fixed_shapes(zoo, keys, batch_sizes, threads: int, rounds: int) -> None:
    print(f"## Dynamic batch against fixed shape ({threads} threads, medians of {rounds} interleaved rounds)\n")
    table_head("| model | batch | dynamic ms | fixed ms | dynamic / fixed | compile ms, fixed | max logit diff |")
    for key in keys:
        m = zoo.load_model(key)
        ovm = make_runner(m, "openvino", threads=threads).fn  # tinysaver's OpenVinoModel
        for bs in batch_sizes:
            x = np.random.default_rng(0).random((bs, *m.preprocess.input_size), dtype=np.float32)
            t0 = time.perf_counter()
            ovm.expect_batch(bs)
            compile_ms = (time.perf_counter() - t0) * 1e3
            fixed = ovm.static[bs]
            calls = max(3, 200 // bs)
            pairs = [(median_ms(ovm.dynamic, x, calls), median_ms(fixed, x, calls)) for _ in range(rounds)]
            d, f = np.median([p[0] for p in pairs]), np.median([p[1] for p in pairs])
            diff = float(np.abs(np.asarray(ovm.dynamic(x)[0]) - np.asarray(fixed(x)[0])).max())
            print(f"| {key} | {bs} | {d:.3f} | {f:.3f} | {d / f:.2f}× | {compile_ms:.0f} | {diff:.1e} |", flush=True)


def pinning(zoo, key: str, calls: int) -> None:
    m = zoo.load_model(key)
    path = make_runner(m, "openvino").export_path  # the cached ONNX export
    core = ov.Core()
    x = np.random.default_rng(0).random((1, *m.preprocess.input_size), dtype=np.float32)
    print(f"\n## Two 1-thread copies of {key} at batch 1 in two threads ({calls} calls each)\n")
    table_head("| CPU pinning | one copy alone, ms/call | two in parallel, ms/call | parallel / alone |")
    for pin in (True, False):
        cfg = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": pin}
        a, b = (core.compile_model(core.read_model(str(path)), "CPU", cfg) for _ in range(2))
        for c in (a, b):
            for _ in range(20):
                c(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            a(x)
        alone = (time.perf_counter() - t0) / calls

        def loop(c):
            for _ in range(calls):
                c(x)

        workers = [threading.Thread(target=loop, args=(c,)) for c in (a, b)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        both = (time.perf_counter() - t0) / (2 * calls)
        print(f"| {'on' if pin else 'off'} | {alone * 1e3:.3f} | {both * 1e3:.3f} | {both / alone:.2f} |", flush=True)


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["mobilenetv3_small_050", "mobilenetv3_small_075", "resnet10t",
                                                    "convnext_atto"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pair-model", default="resnet10t")
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    fixed_shapes(zoo, args.models, args.batch_sizes, args.threads, args.rounds)
    pinning(zoo, args.pair_model, args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
