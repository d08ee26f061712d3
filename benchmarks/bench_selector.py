"""Whole-zoo selection speed on a synthetic zoo shaped like the paper's (44 models × 50,000 samples).

    python benchmarks/bench_selector.py

Prints the exact sweep's time for all bases and all pairs, and its ratio to a per-pair baseline
that scans 1,000 evenly spaced thresholds, measured in the same run on the same data.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tinysaver.policy import exits
from tinysaver.selector import SelectorConfig, select_all_arrays
from tinysaver.splits import SplitData


def synthetic_zoo(models: int = 44, samples: int = 50_000, classes: int = 1000, seed: int = 0):
    """Accuracy grows with cost; a shared per-sample difficulty makes models agree like real ones."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    difficulty = rng.random(samples)
    names = [f"m{i:02d}" for i in range(models)]
    costs = dict(zip(names, np.geomspace(5e7, 3e11, models)))
    accs = np.linspace(0.60, 0.88, models)
    pred, conf = {}, {}
    for name, acc in zip(names, accs):
        right = difficulty + rng.normal(0, 0.15, samples) < acc
        p = np.where(right, labels, rng.integers(0, classes, samples))
        c = np.clip(np.where(right, 0.55, 0.3) + rng.normal(0, 0.2, samples), 0.001, 1.0)
        pred[name], conf[name] = p, np.round(c.astype(np.float32), 4)  # rounding adds real-world ties
    half = samples // 2
    calib = SplitData("calib", labels[:half], {k: v[:half] for k, v in pred.items()}, {k: v[:half] for k, v in conf.items()})
    test = SplitData("test", labels[half:], {k: v[half:] for k, v in pred.items()}, {k: v[half:] for k, v in conf.items()})
    return names, costs, calib, test, SplitData("all", labels, pred, conf)


def grid_scan_pair(sd: SplitData, saver: str, base: str, cs: float, cb: float, steps: int = 1000):
    """Baseline: try ``steps`` evenly spaced thresholds, zero-loss criterion."""
    y = sd.labels
    s_ok = sd.pred[saver] == y
    b_ok = sd.pred[base] == y
    base_correct = b_ok.sum()
    best = (cs / cb + 1.0, None)
    for t in np.linspace(0, 1, steps):
        ex = exits(sd.conf[saver], t)
        if s_ok[ex].sum() + b_ok[~ex].sum() >= base_correct:
            cost = cs / cb + 1 - ex.mean()
            if cost < best[0]:
                best = (cost, t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=44)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--baseline-pairs", type=int, default=0, help="0 = every pair")
    args = ap.parse_args()
    names, costs, _, _, whole = synthetic_zoo(args.models, args.samples)
    cfg = SelectorConfig(criterion="zero", max_stages=2)
    ncls = {m: 1000 for m in names}
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        sels, _ = select_all_arrays("synthetic", names, costs, ncls, whole, None, cfg)
        runs.append(time.perf_counter() - t0)
    ours = min(runs)
    pairs = [(s, b) for b in names for s in names if costs[s] < costs[b]]
    todo = pairs if not args.baseline_pairs else pairs[:: max(1, len(pairs) // args.baseline_pairs)]
    t0 = time.perf_counter()
    for s, b in todo:
        grid_scan_pair(whole, s, b, costs[s], costs[b])
    per_pair = (time.perf_counter() - t0) / len(todo)
    base_total = per_pair * len(pairs)
    found = sum(s.found for s in sels)
    print(f"synthetic zoo: {len(names)} models × {args.samples} samples, {len(pairs)} saver–base pairs")
    print(f"exact sweep, whole zoo (all bases, all pairs): {ours:.3f} s (best of 3; {found} bases got a saver)")
    print(f"1,000-step grid scan baseline: {base_total:.2f} s for all pairs "
          f"({'measured on every pair' if len(todo) == len(pairs) else f'{len(todo)} pairs measured, scaled'})")
    print(f"speedup vs baseline: {base_total / ours:.1f}x; target ≤ 1 s: {'met' if ours <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
