"""The guaranteed criterion against MAPIE's Learn-then-Test risk control, on real predictions.

    python benchmarks/guarantee_table.py --zoo imagenet-lite --pair tf_efficientnet_lite0.pypi_in1k,tf_efficientnet_lite2.pypi_in1k
    python benchmarks/guarantee_table.py --zoo fashion-mnist --pair mobilenetv3_small_075,resnet10t

The zoo's splits (all but ``train``, unless ``--splits`` says otherwise) are pooled into one finite population. Each repetition draws a random half as
the calibration set, picks a threshold with each method at the same (ε, δ), and scores it on the
whole population, whose loss (base accuracy − cascade accuracy) is the true loss of that threshold.
A violation is a true loss above ε; each method promises a violation rate ≤ δ.

Methods, all on the same data-independent threshold grid and fixed-sequence testing:
- ours, wsr: the betting test on the signed loss (tinysaver's default);
- ours, clopper-pearson: upper limit on harms minus lower limit on repairs;
- MAPIE LTT: BinaryClassificationController (exit = 1 when conf ≥ t), risk = harm rate (MAPIE's
  risks are rates in [0, 1], so repairs cannot offset harms), Hoeffding–Bentkus p-values,
  fwer_method="fixed_sequence", and the threshold with the most exits among the valid ones.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from tinysaver.policy import exits
from tinysaver.criteria import GUARANTEE_GRID
from tinysaver.sweep import SaverOrder, best_exit
from tinysaver.zoo import load_zoo
from common import parser, table_head


def pooled(zoo, saver: str, base: str, splits):
    conf, s_ok, b_ok = [], [], []
    for split in splits:
        ps, pb = zoo.predictions(saver, split), zoo.predictions(base, split)
        conf.append(ps.conf)
        s_ok.append(ps.pred == ps.labels)
        b_ok.append(pb.pred == pb.labels)
    return np.concatenate(conf), np.concatenate(s_ok), np.concatenate(b_ok)


def mapie_threshold(conf, s_ok, b_ok, eps: float, delta: float) -> float:
    from mapie.risk_control import BinaryClassificationController, BinaryRisk

    harm = BinaryRisk(risk_occurrence=lambda y_true, y_pred: (y_true == 1) & (y_pred == 1),
                      risk_condition=lambda y_true, y_pred: np.ones_like(y_true, dtype=bool), higher_is_better=False)
    ctrl = BinaryClassificationController(
        predict_function=lambda X: np.stack([1 - conf[X[:, 0]], conf[X[:, 0]]], axis=1), risk=harm,
        target_level=eps, confidence_level=1 - delta, best_predict_param_choice="predicted_positive_fraction",
        list_predict_params=GUARANTEE_GRID.copy(), fwer_method="fixed_sequence")  # safest (t near 1) first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl.calibrate(np.arange(len(conf))[:, None], (b_ok & ~s_ok).astype(int))
    valid = np.atleast_1d(getattr(ctrl, "valid_predict_params", []))
    return float(valid.min()) if len(valid) else np.inf  # the most exits among the certified thresholds


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--pair", default="mobilenetv3_small_075,resnet10t", help="SAVER,BASE")
    ap.add_argument("--tolerance", type=float, default=1.0, help="ε in accuracy points")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", help="comma-separated splits to pool (default: all but 'train', which the models "
                                     "were fit on)")
    args = ap.parse_args()
    saver, base = args.pair.split(",")
    zoo = load_zoo(args.zoo)
    splits = args.splits.split(",") if args.splits else [s for s in zoo.splits if s != "train"]
    conf_all, s_all, b_all = pooled(zoo, saver, base, splits)
    N = len(conf_all)
    eps = args.tolerance / 100
    rng = np.random.default_rng(args.seed)
    methods = ["ours, wsr", "ours, clopper-pearson", "MAPIE LTT (harm rate, HB)"]
    exit_share = {m: [] for m in methods}
    viol = {m: 0 for m in methods}
    secs = {m: 0.0 for m in methods}
    for _ in range(args.repeats):
        cal = rng.permutation(N)[: N // 2]
        c, s, b = conf_all[cal], s_all[cal], b_all[cal]
        for m in methods:
            t0 = time.perf_counter()
            if m.startswith("ours"):
                _, t = best_exit(SaverOrder.build(c, s), b, "guaranteed", args.tolerance, args.delta, m.split(", ")[1])
            else:
                t = mapie_threshold(c, s, b, eps, args.delta)
            secs[m] += time.perf_counter() - t0
            ex = exits(conf_all, t)
            exit_share[m].append(ex.mean())
            viol[m] += (b_all[ex].sum() - s_all[ex].sum()) / N > eps
    print(f"zoo {args.zoo}: {saver} → {base}, population {N} samples ({'+'.join(splits)} pooled), calibration draws of "
          f"{N // 2}, {args.repeats} repetitions, ε = {args.tolerance} pts, δ = {args.delta}")
    table_head("| method | mean exit ratio | exit ratio vs MAPIE | violation rate (promised ≤ δ) | s per selection |")
    ref = np.mean(exit_share[methods[-1]])
    for m in methods:
        e = np.mean(exit_share[m])
        print(f"| {m} | {e:.2%} | {e / ref if ref else float('nan'):.3f}× | {viol[m] / args.repeats:.1%} | "
              f"{secs[m] / args.repeats:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
