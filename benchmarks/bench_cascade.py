"""Cascade throughput against the base alone, and against the ideal from stage latencies.

    python benchmarks/bench_cascade.py --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k
    python benchmarks/bench_cascade.py --zoo fashion-mnist --base resnet10t

The threshold comes from the selector (zero loss on the calibration split). Images are decoded
once before timing; each timed run includes every stage's own preprocessing. The ideal time per
image is t(saver) + (1 − exit ratio) · t(base), from the stages timed alone on the same images.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tinysaver.cascade import Cascade, build_cascade
from tinysaver.data import load_dataset
from tinysaver.selector import SelectorConfig, select
from tinysaver.zoo import load_zoo


def timed(cascade: Cascade, images, bs: int, reps: int):
    cascade.predict(images[: min(len(images), bs)], batch_size=bs)  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = cascade.predict(images, batch_size=bs)
        ts.append(time.perf_counter() - t0)
    return min(ts), res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="imagenet-lite")
    ap.add_argument("--base", default="tf_efficientnet_lite2.pypi_in1k")
    ap.add_argument("--dataset", help="dataset URI of the images (default: the zoo's held-out split source)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    sel, _ = select(zoo, args.base, SelectorConfig(criterion="zero", max_stages=2))
    if not sel.found:
        print(sel.message)
        return 1
    uri = args.dataset or zoo.splits.get("test", next(iter(zoo.splits.values())))["source"]
    data = load_dataset(uri, progress=False, limit=args.images)
    images = data.images
    cas = build_cascade(sel, zoo)
    saver_only = Cascade(cas.stages[:1], [])
    base_only = Cascade(cas.stages[-1:], [])
    print(f"{args.zoo}: {sel.savers[0].model} (conf ≥ {sel.savers[0].threshold:.4f}) → {args.base}; "
          f"{len(data)} images from {uri}; torch threads {torch.get_num_threads()}")
    print("| batch | base img/s | cascade img/s | speedup | ideal speedup | cascade/ideal | exit ratio | "
          "base acc | cascade acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        tb, rb = timed(base_only, images, bs, args.reps)
        ts, _ = timed(saver_only, images, bs, args.reps)
        tc, rc = timed(cas, images, bs, args.reps)
        exit_ratio = float((rc.stage == 0).mean())
        ideal = ts + (1 - exit_ratio) * tb
        n = len(images)
        acc_b = float((rb.pred == data.labels).mean())
        acc_c = float((rc.pred == data.labels).mean())
        print(f"| {bs} | {n / tb:.1f} | {n / tc:.1f} | {tb / tc:.2f}x | {tb / ideal:.2f}x | {ideal / tc:.2f} | "
              f"{exit_ratio:.1%} | {100 * acc_b:.2f}% | {100 * acc_c:.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
