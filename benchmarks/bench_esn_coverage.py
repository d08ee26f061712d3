"""The ESN's guaranteed exit policy on a trained Fashion-MNIST pair: coverage over seeded splits.

    python benchmarks/bench_esn_coverage.py --epochs 3 --splits 200

Trains an ESN on the pair (``train``, features cached, ``esn/configs/default.yaml`` with
``--epochs``), then pools its exits' outputs on ``calib`` and ``test`` and cuts them into seeded
halves. On each split the guaranteed policy (Learn-then-Test on one shared threshold for every exit,
``esn.policy.choose_policy``) is chosen on one half at ε and δ, for each test, and checked on the
other: a split *violates* when the held-out loss against the base exceeds ε. That rate carries the
holdout's own sampling noise (a policy whose true loss is just under ε shows more than ε on a
held-out half often), so a second rate scores each policy on the whole pooled population, of which
the calibration half is a random draw: its loss there is the policy's true loss on that finite
population, the quantity the guarantee bounds, as in ``benchmarks/guarantee_table.py``. The
guarantee asks that rate to stay ≤ δ. Reported beside them: the share of the held-out images
answered before the base's head. Figures depend on no timing.
"""
import time

import numpy as np
from common import parser, table_head


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--saver", default="mobilenetv3_small_075")
    ap.add_argument("--config", default="esn/configs/default.yaml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--tolerance", type=float, default=1.0, help="ε in accuracy points")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--methods", default="wsr,clopper-pearson")
    args = ap.parse_args()

    import torch

    from esn.exits import offline_outputs
    from esn.policy import choose_policy
    from esn.train import Pair, TrainSettings, esn_splits, frozen_features, train_esn
    from tinysaver.zoo import load_zoo

    torch.manual_seed(0)
    zoo = load_zoo(args.zoo)
    pair = Pair.from_zoo(zoo, args.saver, args.base)
    train, calib, test = esn_splits(zoo)
    t0 = time.perf_counter()
    settings = TrainSettings.from_yaml(args.config, epochs=args.epochs)
    esn = train_esn(pair, train, settings, log=lambda s: None, progress=False, cache=frozen_features(pair, train.images))
    trained_s = time.perf_counter() - t0
    outs = [offline_outputs(esn, frozen_features(pair, ds.images), ds.labels) for ds in (calib, test)]
    preds = np.concatenate([o["preds"] for o in outs], axis=1)
    confs = np.concatenate([o["confs"] for o in outs], axis=1)
    base_pred = np.concatenate([o["base_pred"] for o in outs])
    labels = np.concatenate([o["labels"] for o in outs])
    n_exits, n = preds.shape
    print(f"{args.zoo}: {args.saver} → {args.base}, ESN with {n_exits - 1} exits after the saver, trained "
          f"{args.epochs} epochs in {trained_s:.0f} s; {n} samples (calib+test) cut in seeded halves, {args.splits} "
          f"splits; ε = {args.tolerance} pts, δ = {args.delta}", flush=True)

    rows = {m: [] for m in args.methods.split(",")}
    for seed in range(args.splits):
        perm = np.random.default_rng(seed).permutation(n)
        cal, hold = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        for method in rows:
            pol = choose_policy(preds[:, cal], confs[:, cal], base_pred[cal], labels[cal], "guaranteed",
                                args.tolerance, args.delta, method=method)
            ans, where = pol.apply(preds, confs, base_pred)
            ok, base_ok = ans == labels, base_pred == labels
            loss = 100 * (base_ok[hold].mean() - ok[hold].mean())
            population = 100 * (base_ok.mean() - ok.mean())
            rows[method].append((loss, (where[hold] < n_exits).mean(), pol.thresholds[0], population))
    table_head(f"\n| test | splits | violation rate, population loss > {args.tolerance} pts | held-out loss > "
          f"{args.tolerance} pts | mean held-out loss (pts) | mean share answered before the base head | "
          "median shared threshold |")
    for method, r in rows.items():
        r = np.array(r, dtype=float)
        print(f"| {method} | {args.splits} | {np.mean(r[:, 3] > args.tolerance):.3f} | "
              f"{np.mean(r[:, 0] > args.tolerance):.3f} | {r[:, 0].mean():.3f} | {r[:, 1].mean():.3f} | "
              f"{np.median(r[:, 2]):.4g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
