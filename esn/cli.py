"""``tinysaver esn train | eval | grid``."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def esn_splits(zoo, seed: int = 0, limit: int | None = None):
    """(train, calib, test) DecodedSets: the zoo's own splits, or its first split cut 50/25/25."""
    from tinysaver.data import load_dataset

    names = ("train", "calib", "test")
    if all(n in zoo.splits for n in names):
        sets = []
        for n in names:
            ds = load_dataset(zoo.splits[n]["source"], progress=False, limit=None)
            if ds.fingerprint != zoo.splits[n]["fingerprint"]:
                raise ValueError(f"split {n!r} on disk differs from the one zoo {zoo.name!r} was profiled on")
            sets.append(ds if limit is None else ds.subset(range(min(limit, len(ds)))))
        return tuple(sets)
    first = next(iter(zoo.splits))
    ds = load_dataset(zoo.splits[first]["source"], progress=False)
    perm = np.random.default_rng(seed).permutation(len(ds))
    a, b = len(ds) // 2, 3 * len(ds) // 4
    return ds.subset(np.sort(perm[:a])), ds.subset(np.sort(perm[a:b])), ds.subset(np.sort(perm[b:]))


def _pair(args, granularity="stage"):
    from tinysaver.zoo import load_zoo

    from .train import Pair

    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    return zoo, Pair.from_zoo(zoo, args.saver, args.base, granularity)


def cmd_train(args) -> int:
    from .train import TrainSettings, save_esn, train_esn

    settings = TrainSettings.from_yaml(args.config, epochs=args.epochs, num_layers=args.num_layers, dim=args.dim)
    zoo, pair = _pair(args, settings.granularity)
    train, _, _ = esn_splits(zoo, limit=settings.train_limit)
    esn = train_esn(pair, train, settings)
    save_esn(args.out, esn, pair, settings)
    print(f"ESN saved to {args.out}")
    return 0


def evaluate_checkpoint(zoo, pair, esn, criterion="zero", tolerance=0.0, dynamic_check: int = 256, log=print,
                        splits=None, features=None):
    """Policy on calib, results on test, budget table and a dynamic-vs-offline exactness check.

    ``splits`` (train, calib, test) and ``features`` ({'calib': ..., 'test': ...} from
    :func:`esn.train.frozen_features`) may be passed in to avoid recomputing them.
    """
    from tinysaver.selector import SaverOrder, best_exit

    from .evaluate import budget_table, exit_costs, saver_cascade
    from .policy import choose_policy, dynamic_predict, offline_exit_outputs
    from .train import frozen_features

    _, calib, test = splits or esn_splits(zoo)
    out = {}
    for name, ds in (("calib", calib), ("test", test)):
        f = features[name] if features else frozen_features(pair, ds.images)
        p, c = offline_exit_outputs(esn, f)
        out[name] = {"preds": p, "confs": c, "base_pred": f["base_logits"].argmax(-1).numpy(), "labels": ds.labels}
    cal, tst = out["calib"], out["test"]
    costs = exit_costs(pair.saver, pair.base, pair.base_staged, esn)
    per_exit = costs.per_exit()
    policy = choose_policy(cal["preds"], cal["confs"], cal["base_pred"], cal["labels"], criterion, tolerance)
    ans, where = policy.apply(tst["preds"], tst["confs"], tst["base_pred"])
    # the plain saver cascade under the same criterion, for comparison
    so = SaverOrder.build(cal["confs"][0], cal["preds"][0] == cal["labels"])
    k = best_exit(so, cal["base_pred"] == cal["labels"], criterion, tolerance, 0.1)
    casc, casc_cost = saver_cascade(tst, float(so.thresholds[k]), costs)
    exit_acc = [(p == tst["labels"]).mean() for p in tst["preds"]]
    summary = {
        "base_acc": float((tst["base_pred"] == tst["labels"]).mean()),
        "cascade_acc": float((casc == tst["labels"]).mean()), "cascade_cost": float(casc_cost),
        "esn_acc": float((ans == tst["labels"]).mean()), "esn_cost": float(per_exit[where].mean() / costs.base_total),
        "esn_overhead_pct": costs.esn_overhead_pct, "esn_params": sum(p.numel() for p in esn.parameters()),
        "exit_accuracy": [float(a) for a in exit_acc], "policy": policy.thresholds,
        "exit_share": [float((where == i).mean()) for i in range(len(per_exit))],
    }
    log(f"test accuracy per exit (0 = saver): {', '.join(f'{100 * a:.2f}' for a in exit_acc)}")
    log(f"policy ({criterion}) thresholds: {', '.join(f'{t:.4f}' for t in policy.thresholds)}")
    log(f"share answered per exit (last = base head): {', '.join(f'{100 * s:.1f}%' for s in summary['exit_share'])}")
    log(f"base alone:     {100 * summary['base_acc']:.2f}% at 100% FLOPs")
    log(f"saver cascade:  {100 * summary['cascade_acc']:.2f}% at {100 * casc_cost:.1f}% FLOPs")
    log(f"saver + ESN:    {100 * summary['esn_acc']:.2f}% at {100 * summary['esn_cost']:.1f}% FLOPs "
        f"(ESN overhead {costs.esn_overhead_pct:.2f}% of base FLOPs, {summary['esn_params']} params)")
    rows = budget_table(cal, tst, costs)
    summary["budget"] = rows
    log("| budget | base alone | saver cascade | saver + ESN |\n|---|---|---|---|")
    for r in rows:
        log(f"| {r['budget']} | {r['base alone']} | {r['saver cascade']} | {r['saver + ESN']} |")
    if dynamic_check:
        imgs = test.images[:dynamic_check]
        dyn, dwhere = dynamic_predict(pair.saver, pair.base, pair.base_staged, esn, policy, imgs, batch_size=64)
        ref_ans, ref_where = policy.apply(tst["preds"][:, :dynamic_check], tst["confs"][:, :dynamic_check],
                                          tst["base_pred"][:dynamic_check])
        same = float(((dyn == ref_ans) & (dwhere == ref_where)).mean())
        summary["dynamic_match"] = same
        log(f"dynamic inference vs offline policy on {len(imgs)} test images: {100 * same:.1f}% identical")
    return summary


def cmd_eval(args) -> int:
    from tinysaver.zoo import load_zoo

    from .train import Pair, load_esn

    esn, ck = load_esn(args.checkpoint, saver=args.saver, base=args.base)
    zoo = load_zoo(args.zoo or ck["zoo"], Path(args.root) if args.root else None)
    pair = Pair.from_zoo(zoo, ck["saver"], ck["base"], ck["settings"]["granularity"])
    evaluate_checkpoint(zoo, pair, esn, args.criterion, args.tolerance)
    return 0


def cmd_grid(args) -> int:
    from .train import TrainSettings, frozen_features, train_esn

    zoo, pair = _pair(args)
    splits = esn_splits(zoo)
    train, calib, test = splits
    cache = frozen_features(pair, train.images)
    feats = {"calib": frozen_features(pair, calib.images), "test": frozen_features(pair, test.images)}
    rows = []
    for layers in args.layers:
        for dim in args.dims:
            settings = TrainSettings.from_yaml(args.config, num_layers=layers, dim=dim, epochs=args.epochs)
            esn = train_esn(pair, train, settings, log=lambda s: None, progress=False, cache=cache)
            s = evaluate_checkpoint(zoo, pair, esn, args.criterion, args.tolerance, dynamic_check=0,
                                    log=lambda s: None, splits=splits, features=feats)
            rows.append((layers, dim, s))
            print(f"layers {layers} dim {dim}: ESN {100 * s['esn_acc']:.2f}% at {100 * s['esn_cost']:.1f}% FLOPs "
                  f"(cascade {100 * s['cascade_acc']:.2f}% at {100 * s['cascade_cost']:.1f}%), overhead "
                  f"{s['esn_overhead_pct']:.2f}%", flush=True)
    print("| layers | dim | ESN acc | ESN FLOPs | cascade acc | cascade FLOPs | overhead | params |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, dim, s in rows:
        print(f"| {layers} | {dim} | {100 * s['esn_acc']:.2f}% | {100 * s['esn_cost']:.1f}% | "
              f"{100 * s['cascade_acc']:.2f}% | {100 * s['cascade_cost']:.1f}% | {s['esn_overhead_pct']:.2f}% | "
              f"{s['esn_params']} |")
    return 0


def register(sub) -> None:
    p = sub.add_parser("esn", help="train and evaluate an Exit Sequence Network on a saver–base pair")
    esub = p.add_subparsers(dest="esn_command", required=True)

    def common(q, need_pair=True):
        q.add_argument("--zoo", default="fashion-mnist" if need_pair else None)
        q.add_argument("--base", required=need_pair)
        q.add_argument("--saver", required=need_pair)
        q.add_argument("--criterion", default="zero", choices=["zero", "bounded", "subset", "guaranteed"])
        q.add_argument("--tolerance", type=float, default=0.0)

    t = esub.add_parser("train")
    common(t)
    t.add_argument("--config", help="YAML of ESN settings (see esn/configs/default.yaml)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--num-layers", type=int)
    t.add_argument("--dim", type=int)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_train)

    e = esub.add_parser("eval")
    common(e, need_pair=False)
    e.add_argument("--checkpoint", required=True)
    e.set_defaults(func=cmd_eval)

    g = esub.add_parser("grid")
    common(g)
    g.add_argument("--config")
    g.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--dims", type=int, nargs="+", default=[8, 32, 128])
    g.add_argument("--epochs", type=int)
    g.set_defaults(func=cmd_grid)


__all__ = ["register", "evaluate_checkpoint", "esn_splits"]
