"""Handlers of ``tinysaver esn train | eval | grid`` and ``tinysaver exits compare | regimes`` (registered in tinysaver.cli)."""
from __future__ import annotations

from pathlib import Path


def _pair(args, granularity="stage"):
    from tinysaver.zoo import load_zoo

    from .train import Pair

    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    return zoo, Pair.from_zoo(zoo, args.saver, args.base, granularity)


def cmd_train(args) -> int:
    from .train import TrainSettings, esn_splits, save_esn, train_esn

    settings = TrainSettings.from_yaml(args.config, epochs=args.epochs, num_layers=args.num_layers, dim=args.dim)
    zoo, pair = _pair(args, settings.granularity)
    train, _, _ = esn_splits(zoo, limit=settings.train_limit)
    esn = train_esn(pair, train, settings)
    save_esn(args.out, esn, pair, settings)
    print(f"ESN saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from tinysaver.zoo import load_zoo

    from .train import Pair, load_esn

    esn, ck = load_esn(args.checkpoint, saver=args.saver, base=args.base)
    zoo = load_zoo(args.zoo or ck["zoo"], Path(args.root) if args.root else None)
    pair = Pair.from_zoo(zoo, ck["saver"], ck["base"], ck["settings"]["granularity"])
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(zoo, pair, esn, args.criterion, args.tolerance)
    return 0


def cmd_grid(args) -> int:
    from .evaluate import evaluate_checkpoint
    from .train import TrainSettings, esn_splits, frozen_features, train_esn

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


def cmd_compare(args) -> int:
    import json

    from tinysaver.zoo import atomic_write_bytes, load_zoo

    from .compare import CompareSettings, compare, format_rows, parse_families, plot_rows

    families = parse_families(args.methods)  # before anything loads
    settings = CompareSettings(epochs=args.epochs, label_free=args.label_free, calibrate=args.calibrate,
                               alpha=args.alpha, gate_lambda=args.gate_lambda, lf_tolerance=args.lf_tolerance,
                               wallclock_images=args.wallclock_images, train_limit=args.train_limit)
    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    rows = compare(zoo, args.saver, args.base, families, settings)
    print(format_rows(rows))
    if args.png:
        plot_rows(rows, Path(args.png), f"{zoo.name}: {args.base} ← {args.saver}")
        print(f"plot written to {args.png}")
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        atomic_write_bytes(Path(args.json), json.dumps(clean, indent=1).encode())
    return 0


def cmd_regimes(args) -> int:
    from tinysaver.zoo import load_zoo

    from .regimes import REGIMES, RegimeSettings, compare_regimes, format_regimes

    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    bad = sorted(set(regimes) - set(REGIMES))
    if bad or not regimes:
        raise ValueError(f"unknown regime(s) {bad or args.regimes!r}; choose from {', '.join(REGIMES)}")
    settings = RegimeSettings(joint_samples=args.joint_samples, mixed_samples=args.mixed_samples)
    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    print(format_regimes(compare_regimes(zoo, args.base, regimes, settings, args.train_limit)))
    return 0


__all__ = ["cmd_train", "cmd_eval", "cmd_grid", "cmd_compare", "cmd_regimes"]
