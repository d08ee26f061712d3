"""Savers trained to defer against the plain saver, on held-out test.

    python benchmarks/bench_defer.py --quick
    python benchmarks/bench_defer.py --bases resnet10t --losses gatekeeper,base-aware --alphas 0.5,1,2 --epochs 3

For each base, its best plain saver at zero loss (pairs, FLOPs) is fine-tuned on the zoo's ``train``
split with each loss and α (``tinysaver.defer.train_saver``: α chosen again on a held-out part of
train, early stopping there; calib and test never read). Each variant's thresholds are chosen on
``calib`` and reported on ``test``:

- ``zero``: zero loss on calib; test exits, test accuracy against the base's, FLOPs saved;
- ``guaranteed``: ε = 1 point, δ = 0.1 (WSR); test exits, and with ``--splits S`` the violation rate
  over S seeded halves of calib + test pooled (certify on one half, check the other: a split
  violates when its held-out loss exceeds ε);
- ``label-free``: zero disagreement with the base on calib; test exits.

Also the saver's own test accuracy (the price) and the training time. ``--quick``: resnet10t, the
base-aware loss at α = 1, 2 epochs on the first 10,000 train images, no splits; it ends with
``zero-loss exits on test: plain P % trained T %``.

``--imagenet-sample TAR`` cuts the 1,000-image ImageNet sample (one image per class) into seeded
train/calib/test folders of 500/250/250, profiles tf_efficientnet_lite0 and lite2 on them into a
zoo under ``--workdir``, and fine-tunes lite0 for lite2 on the 500 train images: 500 images of 1,000
classes, one each, is very little to learn deferral from, and 250 test images give coarse figures.
"""
import time

import numpy as np
from common import parser, table_head


def policy_on(conf_c, correct_c, base_correct_c, conf_t, criterion: str, tolerance: float = 0.0):
    """The threshold ``criterion`` picks on calib, as a saver → base pair."""
    from tinysaver.sweep import SaverOrder, best_exit

    _, t = best_exit(SaverOrder.build(conf_c, correct_c), base_correct_c, criterion, tolerance, 0.1, "wsr")
    return t


def violation_rate(conf, correct, base_correct, splits: int, tolerance: float = 1.0) -> tuple[float, float]:
    """(violation rate, mean held-out exit ratio) of the guaranteed pair over seeded halves."""
    from tinysaver.policy import confident

    n, bad, exits = len(conf), 0, []
    for seed in range(splits):
        perm = np.random.default_rng(seed).permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        t = policy_on(conf[a], correct[a], base_correct[a], None, "guaranteed", tolerance)
        out = confident(conf[b], t)
        loss = 100 * (base_correct[b].astype(int) - np.where(out, correct[b], base_correct[b]).astype(int)).mean()
        bad += loss > tolerance
        exits.append(out.mean())
    return bad / splits, float(np.mean(exits))


def evaluate(name, out_c, out_t, labels_c, labels_t, base_c, base_t, cost_ratio, splits, seconds=None):
    from tinysaver.policy import confident

    (cc, pc), (ct, pt) = out_c, out_t
    right_c, right_t = pc == labels_c, pt == labels_t
    bright_c, bright_t = base_c == labels_c, base_t == labels_t
    row = {"variant": name, "saver_acc_test": 100 * right_t.mean()}
    t = policy_on(cc, right_c, bright_c, ct, "zero")
    ex = confident(ct, t)
    row["zero_exit_test"] = 100 * ex.mean()
    row["zero_acc_delta_test"] = 100 * (np.where(ex, right_t, bright_t).mean() - bright_t.mean())
    row["zero_flops_saved_test"] = 100 * (1 - (cost_ratio + 1 - ex.mean()))
    tg = policy_on(cc, right_c, bright_c, ct, "guaranteed", 1.0)
    row["guaranteed_exit_test"] = 100 * confident(ct, tg).mean()
    tl = policy_on(cc, pc == base_c, np.ones(len(pc), bool), ct, "zero")
    row["label_free_exit_test"] = 100 * confident(ct, tl).mean()
    if splits:
        conf = np.concatenate([cc, ct])
        right = np.concatenate([right_c, right_t])
        bright = np.concatenate([bright_c, bright_t])
        row["violation_rate"], row["guaranteed_exit_splits"] = violation_rate(conf, right, bright, splits)
    row["train_s"] = seconds
    return row


def print_table(rows: list[dict]) -> None:
    """The rows of :func:`evaluate` as a Markdown table, figures to two decimals."""
    cols = list(dict.fromkeys([c for c in rows[0] if c != "variant"] + ["train_s"]))
    table_head("| variant | " + " | ".join(cols) + " |")
    for row in rows:
        print(f"| {row['variant']} | " + " | ".join(
            "" if row.get(c) is None else f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
            for c in cols) + " |")


def imagenet_zoo(tar: str, workdir: str) -> str:
    """The sample cut in seeded 500/250/250 folders and profiled (lite0, lite2) into a zoo; its folder."""
    import tarfile
    from pathlib import Path

    from tinysaver.models import ModelSpec
    from tinysaver.profiler import ProfileConfig, profile

    work = Path(workdir)
    with tarfile.open(tar) as t:
        members = sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name)
        perm = np.random.default_rng(0).permutation(len(members))
        parts = {"train": perm[:500], "calib": perm[500:750], "test": perm[750:]}
        for split, idx in parts.items():
            d = work / "data" / split
            if d.is_dir() and len(list(d.iterdir())) == len(idx):
                continue
            d.mkdir(parents=True, exist_ok=True)
            for i in idx:
                (d / Path(members[i].name).name).write_bytes(t.extractfile(members[i]).read())
    cfg = ProfileConfig("imagenet-sample-split", {s: f"imagenet:{work / 'data' / s}" for s in parts},
                        [ModelSpec("tf_efficientnet_lite0.pypi_in1k"), ModelSpec("tf_efficientnet_lite2.pypi_in1k")],
                        batch_sizes=[], eval_batch_size=32)
    return str(profile(cfg, work / "zoos", progress=False, log=print))


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--bases", help="comma-separated (default: every base with a saver at zero loss)")
    ap.add_argument("--losses", default="gatekeeper,base-aware")
    ap.add_argument("--alphas", default="0.5,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, help="the first N train images only")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--splits", type=int, default=0, help="seeded calib/test re-splits for the violation rate")
    ap.add_argument("--saver", help="the saver to fine-tune (default: each base's best at zero loss)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--imagenet-sample", help="the shared ImageNet sample tar: cut it and profile lite0/lite2 first")
    ap.add_argument("--workdir", default="/tmp/tinysaver-defer-imagenet")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.imagenet_sample:
        args.zoo = imagenet_zoo(args.imagenet_sample, args.workdir)
        args.bases, args.saver = args.bases or "tf_efficientnet_lite2.pypi_in1k", args.saver or "tf_efficientnet_lite0.pypi_in1k"
    if args.quick:
        args.bases, args.losses, args.alphas, args.epochs, args.limit, args.splits = \
            "resnet10t", "base-aware", "1", 2, 10000, 0

    import torch

    from tinysaver.data import load_dataset
    from tinysaver.defer import DeferSettings, saver_outputs, train_saver
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    torch.set_num_threads(min(2, torch.get_num_threads()))
    zoo = load_zoo(args.zoo)
    bases = args.bases.split(",") if args.bases else [m for m in zoo.measured()]
    print(f"zoo {zoo.name}; losses {args.losses}; α {args.alphas}; {args.epochs} epochs; lr {args.lr}; "
          f"train limit {args.limit}; splits {args.splits}")
    data = {s: load_dataset(zoo.splits[s]["source"], progress=False) for s in ("calib", "test")}
    labels = {s: zoo.split_arrays(s)[1] for s in data}
    quick_line = None
    for base in bases:
        sel = select(zoo, base, SelectorConfig()).best
        if len(sel.models) < 2 and not args.saver:
            print(f"\n{base}: no saver at zero loss; skipped")
            continue
        saver = args.saver or sel.models[0]
        cost_ratio = zoo.entry(saver).flops / zoo.entry(base).flops
        bp = {s: zoo.predictions(base, s).pred for s in data}
        plain = {s: (zoo.predictions(saver, s).conf, zoo.predictions(saver, s).pred) for s in data}
        rows = [evaluate("plain", plain["calib"], plain["test"], labels["calib"], labels["test"], bp["calib"],
                         bp["test"], cost_ratio, args.splits)]
        print(f"\n{base} ← {saver} (FLOPs ratio {cost_ratio:.3f})", flush=True)
        for loss in args.losses.split(","):
            for alpha in (float(a) for a in args.alphas.split(",")):
                s = DeferSettings(loss=loss, alphas=(alpha,), epochs=args.epochs, limit=args.limit, lr=args.lr,
                                  batch_size=args.batch_size, holdout=0.2 if args.imagenet_sample else 0.1)
                t0 = time.perf_counter()
                r = train_saver(zoo, saver, base, s, progress=False, log=lambda *_: None)
                secs = time.perf_counter() - t0
                model = zoo.load_model(saver)
                model.module.load_state_dict(r.state_dict)
                outs = {sp: saver_outputs(model.module, data[sp].images, np.arange(len(data[sp])), model.preprocess, 256)
                        for sp in data}
                rows.append(evaluate(f"{loss} α={alpha:g} (epoch {r.epoch})", outs["calib"], outs["test"],
                                     labels["calib"], labels["test"], bp["calib"], bp["test"], cost_ratio,
                                     args.splits, secs))
                print(f"  {rows[-1]['variant']}: zero-loss exits on test {rows[-1]['zero_exit_test']:.1f} % "
                      f"({secs:.0f} s)", flush=True)
        print_table(rows)
        if base == "resnet10t":
            best = max(rows[1:], key=lambda r: r["zero_exit_test"], default=None)
            if best is not None:
                quick_line = (f"zero-loss exits on test: plain {rows[0]['zero_exit_test']:.1f} % "
                              f"trained {best['zero_exit_test']:.1f} %")
    if quick_line:
        print(quick_line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
