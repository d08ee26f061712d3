"""Held-out accuracy loss of the naive zero-loss rule vs the guaranteed rule, on real predictions.

    python benchmarks/guarantee_table.py --zoo imagenet-lite --split val --tolerance 1.0 --delta 0.1

Repeatedly cuts the split into random calibration/test halves, selects a threshold on the
calibration half with each criterion, and measures the loss (base accuracy − cascade accuracy,
in points) on the test half. The guaranteed rule promises loss ≤ ε with probability ≥ 1 − δ.
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from tinysaver.selector import SaverOrder, best_exit
from tinysaver.zoo import load_zoo


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="imagenet-lite")
    ap.add_argument("--split", default="val")
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    models = sorted(zoo.measured(), key=lambda m: zoo.models[m]["flops"])
    preds = {m: zoo.predictions(m, args.split) for m in models}
    y = preds[models[0]].labels
    n = len(y)
    rng = np.random.default_rng(args.seed)
    print(f"zoo {args.zoo}, split {args.split} ({n} samples), {args.repeats} random half/half splits, "
          f"ε = {args.tolerance} pts, δ = {args.delta}")
    print("| saver → base | rule | mean exit ratio | mean held-out loss (pts) | P(held-out loss > ε) | promised |")
    print("|---|---|---|---|---|---|")
    for s, b in itertools.combinations(models, 2):
        sc, bc, conf = preds[s].pred == y, preds[b].pred == y, preds[s].conf
        for rule in ("zero", "guaranteed"):
            losses, exits = [], []
            for _ in range(args.repeats):
                perm = rng.permutation(n)
                cal, test = perm[: n // 2], perm[n // 2:]
                so = SaverOrder.build(conf[cal], sc[cal])
                k = best_exit(so, bc[cal], rule, args.tolerance, args.delta)
                t = so.thresholds[k]
                ex = conf[test] >= t
                casc = np.where(ex, sc[test], bc[test]).mean()
                losses.append(100 * (bc[test].mean() - casc))
                exits.append(ex.mean())
            losses = np.array(losses)
            print(f"| {short(s)} → {short(b)} | {rule} | {np.mean(exits):.1%} | {losses.mean():.2f} | "
                  f"{(losses > args.tolerance).mean():.1%} | {'≤ ' + format(args.delta, '.0%') if rule == 'guaranteed' else '—'} |")
    return 0


def short(m: str) -> str:
    return m.split(".")[0]


if __name__ == "__main__":
    raise SystemExit(main())
