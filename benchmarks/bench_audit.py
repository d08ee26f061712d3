"""The live audit, replayed offline: false drift on clean traffic, and the delay to call a real shift.

    python benchmarks/bench_audit.py --streams 200 --requests 20000

Streams are drawn (seeded, with replacement) from Fashion-MNIST ``test``, for the default cascade
of the bundled zoo (mobilenetv3_small_075 → resnet10t at its zero-loss threshold). Each request
exits at the saver when its confidence passes the threshold, is audited with probability
``--audit``, and the audit says whether the saver's class differs from the base's: the
``AuditMonitor`` the service runs sees exactly this. Clean traffic uses the zoo's stored
predictions. Shifted traffic uses the same test images rolled right by 8 pixels, run through the
cascade here once. Reported:

- P(any drift) over the clean streams, checked after every request, for each audit fraction
  (the goal: ≤ δ), and how many streams end certified;
- for streams that turn to shifted traffic at request ``--shift-at``: drift before the shift
  (must be none), and the delay in requests to the first drift (median and 90th percentile).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def outcomes(exit_, disagree, n: int, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """(early, hit) per request: hit = exited, audited and disagreeing."""
    idx = rng.integers(0, len(exit_), n)
    early = exit_[idx]
    hit = early & (rng.random(n) < fraction) & disagree[idx]
    return early, hit


def replay(monitor, early: np.ndarray, hit: np.ndarray) -> list[tuple[int, str, str]]:
    for e, h in zip(early.tolist(), hit.tolist()):
        if h:
            monitor.audited(monitor.request(True, audit=True), True)
        else:
            monitor.request(e)  # an audited agreement and no audit settle the same way: no hit
    return monitor.changes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--audits", type=float, nargs="+", default=[0.05, 0.02], help="audit fractions to replay")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy points (the service's default)")
    ap.add_argument("--shift-at", type=int, default=5000)
    args = ap.parse_args()

    import logging

    import torch

    logging.getLogger("tinysaver.serve").setLevel(logging.ERROR)  # thousands of state changes: the table says it

    from tinysaver.cascade import build_cascade
    from tinysaver.data import load_dataset
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve.audit import AuditMonitor
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("fashion-mnist")
    sel = select(zoo, "resnet10t", SelectorConfig()).best
    saver, base = sel.models
    sp, bp = zoo.predictions(saver, "test"), zoo.predictions(base, "test")
    s_pred, s_conf, b_pred = sp.pred, sp.conf, bp.pred
    clean_exit = s_conf >= sel.thresholds[0]
    clean_dis = s_pred != b_pred
    images = load_dataset("fashion-mnist:test", progress=False).images
    res = build_cascade(sel, zoo).predict(torch.roll(images, 8, dims=3), all_stages=True, batch_size=256)
    shift_exit, shift_dis = res.stage == 0, res.stage_pred[0] != res.stage_pred[1]
    print(f"{saver} → {base} at {sel.thresholds[0]:.4f}; clean test: exit {clean_exit.mean():.1%}, loss against the "
          f"base {(clean_exit & clean_dis).mean() * 100:.2f} points; shifted 8 px: exit {shift_exit.mean():.1%}, "
          f"loss {(shift_exit & shift_dis).mean() * 100:.2f} points; δ {args.delta}, tolerance {args.tolerance} points")
    print("\n| audit | streams × requests | P(any drift), clean | ends certified | shifted: drift before the shift | "
          "delay to drift, median | 90th pct | never called |")
    print("|---|---|---|---|---|---|---|---|")
    for a in args.audits:
        t0 = time.perf_counter()
        false, certified, early_alarm, delays, missed = 0, 0, 0, [], 0
        for seed in range(args.streams):
            rng = np.random.default_rng(seed)
            m = AuditMonitor(a, args.delta, args.tolerance)
            changes = replay(m, *outcomes(clean_exit, clean_dis, args.requests, a, rng))
            false += any(to == "drift" for _, _, to in changes)
            certified += m.state == "certified"
            m = AuditMonitor(a, args.delta, args.tolerance)
            replay(m, *outcomes(clean_exit, clean_dis, args.shift_at, a, rng))
            early_alarm += any(to == "drift" for _, _, to in m.changes)
            before = len(m.changes)
            replay(m, *outcomes(shift_exit, shift_dis, args.requests - args.shift_at, a, rng))
            hit = next((r for r, _, to in m.changes[before:] if to == "drift"), None)
            if hit is None:
                missed += 1
            else:
                delays.append(hit - args.shift_at)
        d = np.array(delays) if delays else np.array([np.nan])
        print(f"| {a} | {args.streams} × {args.requests:,} | {false / args.streams:.3f} | "
              f"{certified / args.streams:.0%} | {early_alarm} | {np.nanmedian(d):.0f} | {np.nanpercentile(d, 90):.0f} | "
              f"{missed} |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
