"""What does running two models in turn cost a runtime at batch 1, beyond their separate times?

    python benchmarks/bench_alternation.py --zoo fashion-mnist --backends onnxruntime,openvino --threads 1,2

A cascade at batch 1 runs the saver on an image and, when it does not exit, the base on that same
image next, so the runtime switches models once per non-exiting image. The "ideal" speedup of
bench_backends.py takes each stage's time from running that stage alone. This script measures,
per saver–base pair and backend, with no cascade code in the loop (the runners are called on
prepared batch-1 tensors):

- the saver alone, N calls; the base alone, N calls; the two alternated, N pairs of calls;
  interleaved in that order for ``--repeats`` repetitions (a noisy neighbour slows all three alike);
- ``alternated / (saver + base)``: the price of switching, 1.00 when there is none;
- the cascade/ideal ratio that this price alone allows, for the pair's exit ratio ``e`` on the
  test split: ideal / (ideal + (1 − e) · extra), where ideal = saver + (1 − e) · base and extra =
  alternated − (saver + base).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tinysaver.runtimes import make_runner
from tinysaver.selector import SelectorConfig, select_all
from tinysaver.zoo import load_zoo
from common import parser, table_head


def ms_per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--threads", default="1,2", help="SAVER,BASE intra-op threads of the runtimes")
    ap.add_argument("--calls", type=int, default=300, help="calls (or pairs) per timed loop")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bases", nargs="*", help="only these bases")
    args = ap.parse_args()
    t_saver, t_base = map(int, args.threads.split(","))
    zoo = load_zoo(args.zoo)
    sels = [s for s in select_all(zoo, SelectorConfig())[0]
            if s.found and len(s.models) == 2 and (not args.bases or s.base in args.bases)]
    print(f"zoo {args.zoo}: batch 1, {args.calls} calls per loop, {args.repeats} interleaved repetitions, "
          f"threads saver {t_saver}, base {t_base}; medians (min–max); savers selected on flops\n")
    table_head("| base ← saver | backend | saver ms | base ms | alternated ms per pair | alternated / sum | "
          "exit ratio (test) | cascade/ideal this allows |")
    torch.manual_seed(0)
    for sel in sels:
        saver, base = (zoo.load_model(k) for k in sel.models)
        e = sel.exit_ratio_test[0]  # the saver's share
        for b in args.backends.split(","):
            rs, rb = make_runner(saver, b, threads=t_saver), make_runner(base, b, threads=t_base)
            xs, xb = torch.randn(1, *saver.preprocess.input_size), torch.randn(1, *base.preprocess.input_size)
            with torch.inference_mode():
                for _ in range(20):  # warm-up
                    rs(xs), rb(xb)
                ts, tb, ta = [], [], []
                for _ in range(args.repeats):
                    ts.append(ms_per_call(lambda: rs(xs), args.calls))
                    tb.append(ms_per_call(lambda: rb(xb), args.calls))
                    ta.append(ms_per_call(lambda: (rs(xs), rb(xb)), args.calls))
            ts, tb, ta = map(np.array, (ts, tb, ta))
            price = ta / (ts + tb)
            ideal = ts + (1 - e) * tb
            allows = ideal / (ideal + (1 - e) * (ta - ts - tb))
            print(f"| {sel.base} ← {sel.models[0]} | {b} | {np.median(ts):.3f} | {np.median(tb):.3f} | "
                  f"{np.median(ta):.3f} | {np.median(price):.2f} ({price.min():.2f}–{price.max():.2f}) | {e:.1%} | "
                  f"{np.median(allows):.2f} ({allows.min():.2f}–{allows.max():.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
