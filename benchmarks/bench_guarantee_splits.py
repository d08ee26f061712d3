"""Guaranteed pairs and chains over many seeded calibration/holdout splits: exits kept, and violations.

    python benchmarks/bench_guarantee_splits.py --zoo imagenet-lite --splits 500
    python benchmarks/bench_guarantee_splits.py --zoo fashion-mnist --base resnet10t --splits 200

For each seed the zoo's samples are cut into two seeded halves (the selector's own split: the
first split of the zoo, or calib + test pooled for a zoo that has both). The selector certifies on
the first half at ε and δ, with ``--max-stages 2`` and ``3``, for each test (WSR, Clopper–Pearson).
``mapie-ltt`` is MAPIE's Learn-then-Test (``benchmarks/guarantee_table.py``: harm-rate risk,
Hoeffding–Bentkus, fixed sequence on the same grid), run on each saver at δ / (number of savers),
as the selector splits δ over its pairs; the pair with the least expected FLOPs on the calibration
half is kept. MAPIE's controller takes one threshold, so it has pairs only.
On the second half it records the policy's exit ratio and its loss against the base; a split
*violates* when that held-out loss exceeds ε. The guarantee asks the violation rate to stay ≤ δ
(up to the holdout's own sampling noise), and the issue asks three stages never to exit fewer
than two on the same split. Figures depend on no timing, so a busy machine does not move them.
"""
import sys
import time
from pathlib import Path

import numpy as np
from common import parser, table_head

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = parser("imagenet-lite")
    ap.add_argument("--base", help="default: the zoo's most expensive measured model")
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--methods", default="wsr,clopper-pearson,mapie-ltt")
    args = ap.parse_args()

    from tinysaver.policy import SelectionError
    from tinysaver.selector import SelectorConfig, _select_on
    from tinysaver.splits import SplitData
    from tinysaver.costs import available_costs
    from tinysaver.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    base = args.base or max(zoo.measured(), key=lambda m: zoo.models[m]["flops"])
    costs = available_costs(zoo, zoo.measured(), "flops")
    pool = [m for m in costs if m != base and costs[m] < costs[base]]
    models = [base, *pool]
    splits = [s for s in ("calib", "test") if s in zoo.splits] or list(zoo.splits)[:1]
    preds = {m: [zoo.predictions(m, s) for s in splits] for m in models}
    labels = np.concatenate([p.labels for p in preds[base]])
    pred = {m: np.concatenate([p.pred for p in ps]) for m, ps in preds.items()}
    conf = {m: np.concatenate([p.conf for p in ps]) for m, ps in preds.items()}
    n = len(labels)
    print(f"{args.zoo}: base {base}, savers {', '.join(pool)}; {n} samples ({'+'.join(splits)}) cut in seeded halves, "
          f"{args.splits} splits; ε = {args.tolerance} pts, δ = {args.delta}", flush=True)

    def part(idx, name):
        return SplitData(name, labels[idx], {m: v[idx] for m, v in pred.items()}, {m: v[idx] for m, v in conf.items()})

    def mapie_pair(calib, hold) -> tuple:
        """(held-out exit ratio, held-out loss in points, stages, certified exit ratio) of the
        cheapest MAPIE-certified pair, or of the base alone."""
        from guarantee_table import mapie_threshold

        from tinysaver.policy import exits

        b_ok = calib.pred[base] == calib.labels
        best = (costs[base], None, np.inf)
        for saver in pool:
            t = mapie_threshold(calib.conf[saver], calib.pred[saver] == calib.labels, b_ok, args.tolerance / 100,
                                args.delta / len(pool))
            cost = costs[saver] + (1 - exits(calib.conf[saver], t).mean()) * costs[base]
            if cost < best[0]:
                best = (cost, saver, t)
        _, saver, t = best
        if saver is None:
            return 0.0, 0.0, 1, 0.0
        ex = exits(hold.conf[saver], t)
        answer = np.where(ex, hold.pred[saver], hold.pred[base])
        loss = 100 * ((hold.pred[base] == hold.labels).mean() - (answer == hold.labels).mean())
        return float(ex.mean()), float(loss), 2, float(exits(calib.conf[saver], t).mean())

    rows = {}
    t0 = time.perf_counter()
    for seed in range(args.splits):
        perm = np.random.default_rng(seed).permutation(n)
        calib, hold = part(np.sort(perm[: n // 2]), "calib"), part(np.sort(perm[n // 2:]), "holdout")
        for method in args.methods.split(","):
            if method == "mapie-ltt":
                rows.setdefault((method, 2), []).append(mapie_pair(calib, hold))
                continue
            got = {}
            for stages in (2, 3):
                cfg = SelectorConfig(criterion="guaranteed", tolerance=args.tolerance, delta=args.delta,
                                     max_stages=stages, guarantee_method=method)
                try:
                    sel = _select_on(zoo.name, base, pool, costs, calib, hold, cfg, top=1).best
                except SelectionError as e:
                    raise SystemExit(str(e))
                ratio = float(sum(sel.exit_ratio_test[:-1])) if sel.found else 0.0
                certified = float(sum(sel.exit_ratio_calib[:-1])) if sel.found else 0.0
                loss = 100 * (sel.acc_base_test - sel.acc_cascade_test)
                got[stages] = (ratio, loss, len(sel.stages), certified)
                rows.setdefault((method, stages), []).append(got[stages])
            # the rule: three stages never certify fewer exits than two (calibration half)
            rows.setdefault((method, "never fewer"), []).append(got[3][3] >= got[2][3] - 1e-12)
        if (seed + 1) % 50 == 0:
            print(f"  {seed + 1} splits, {time.perf_counter() - t0:.0f} s", flush=True)

    table_head(f"\n| test | stages | mean held-out exit ratio | violation rate (held-out loss > {args.tolerance} pts) | "
          "chains chosen | mean certified exit ratio | 3 stages certify ≥ 2 stages |")
    for method in args.methods.split(","):
        for stages in (2, 3):
            if (method, stages) not in rows:
                print(f"| {method} | {stages} | pairs only | | | | |")
                continue
            r = np.array(rows[(method, stages)], dtype=float)
            never = np.mean(rows[(method, "never fewer")]) if stages == 3 else float("nan")
            print(f"| {method} | {stages} | {r[:, 0].mean():.3f} | {np.mean(r[:, 1] > args.tolerance):.3f} | "
                  f"{np.mean(r[:, 2] == 3):.3f} | {r[:, 3].mean():.3f} | "
                  f"{'' if stages == 2 else f'{never:.3f} of splits'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
