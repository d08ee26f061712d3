"""``tinysaver esn train | eval | grid | serve`` and ``tinysaver exits compare | regimes``.

``register`` is this package's entry in the ``tinysaver.commands`` entry-point group (see
pyproject.toml): tinysaver finds it there, so tinysaver never imports esn. Handlers import the
library on use. Defaults are the selector's (``SelectorConfig``) and the settings classes'.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinysaver.backends import DEFAULT_BACKEND
from tinysaver.cli._args import (add_pair, add_selector_args, add_zoo, command, finite_float, float_list, group,
                                 positive_int)
from tinysaver.cli.serve import add_serve_args, need_serve, run_app, serve_options
from tinysaver.errors import UsageError
from tinysaver.policy import CRITERIA
from tinysaver.selector import SelectorConfig
from tinysaver.serve import application, replica_needs
from tinysaver.serve.http import token_or_env
from tinysaver.yamlfile import named_config
from tinysaver.zoo import atomic_write_bytes, load_zoo

from .methods import FAMILIES
from .settings import REGIMES, CompareSettings, RegimeSettings


def esn_config(text: str) -> Path:
    """``--config``: a path, or the name of a settings file packaged in ``esn/configs``."""
    try:
        return named_config(text, Path(__file__).resolve().parent / "configs", "packaged ESN settings")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    d = SelectorConfig()
    esub = group(sub, "esn", "train, evaluate and serve an Exit Sequence Network on a saver–base pair", "esn_command")
    q = command(esub, "train", cmd_train, "train an ESN on a saver–base pair")
    add_zoo(q)
    add_pair(q)
    q.add_argument("--config", type=esn_config, help="YAML of ESN settings: a path, or a packaged one's name "
                                                     "(default, paper-augment)")
    q.add_argument("--epochs", type=positive_int)
    q.add_argument("--num-layers", type=int)
    q.add_argument("--dim", type=positive_int)
    add_train_limit(q)
    q.add_argument("--out", required=True)
    q = command(esub, "eval", cmd_eval, "choose exit thresholds on calib, report test and budgets")
    q.add_argument("--checkpoint", required=True)
    add_zoo(q, default=None, help_="default: the zoo the checkpoint was trained in")
    q.add_argument("--base", help="refuse the checkpoint unless it was trained for this base")
    q.add_argument("--saver", help="refuse the checkpoint unless it was trained for this saver")
    q.add_argument("--criterion", choices=CRITERIA, default=d.criterion)
    q.add_argument("--tolerance", type=finite_float, default=d.tolerance)
    q.add_argument("--limit", type=positive_int, help="evaluate on the first N images of calib and of test only")
    q = command(esub, "grid", cmd_grid, "train and evaluate ESNs over bus depths and widths")
    add_zoo(q)
    add_pair(q)
    q.add_argument("--criterion", choices=CRITERIA, default=d.criterion)
    q.add_argument("--tolerance", type=finite_float, default=d.tolerance)
    q.add_argument("--config", type=esn_config)
    q.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--dims", type=positive_int, nargs="+", default=[8, 32, 128])
    q.add_argument("--epochs", type=positive_int)
    q = command(esub, "serve", cmd_serve,
                "serve a checkpoint's saver and base with its exits inside the base, on Ray Serve (one deployment "
                "per base part); thresholds from --thresholds, else chosen on the zoo's calib split")
    add_selector_args(q)
    q.add_argument("--checkpoint", required=True, help="a 'tinysaver esn train' checkpoint")
    q.add_argument("--base", help="refuse the checkpoint unless it was trained for this base")
    q.add_argument("--saver", help="refuse the checkpoint unless it was trained for this saver")
    q.add_argument("--thresholds", type=float_list,
                   help="the saver's threshold and one per exit, comma-separated (inf disables an exit)")
    q.add_argument("--backend", default=DEFAULT_BACKEND, help=argparse.SUPPRESS)  # ESN parts run on it only
    q.add_argument("--accept-preprocess-change", action="store_true",
                   help="run a model whose current timm data config differs from the one the zoo recorded")

    add_serve_args(q)

    xsub = group(sub, "exits", "compare the ESN with the related early-exit methods on one pair", "exits_command")
    q = command(xsub, "compare", cmd_compare,
                "train ESN, SDN, ZTW, gates and label-free exits on one pair; one table and one plot")
    add_zoo(q)
    add_pair(q)
    q.add_argument("--methods", default=",".join(FAMILIES),
                   help="comma-separated: esn, sdn, ztw (with its two ablations), gates, label-free")
    _settings_args(q)
    q.add_argument("--png", help="write accuracy against FLOPs here")
    q.add_argument("--json", help="write the rows here")
    q = command(xsub, "regimes", cmd_regimes,
                "SDN exits trained disjoint, joint and mixed (seed 002): what each costs the base head")
    add_zoo(q)
    q.add_argument("--base", required=True)
    q.add_argument("--regimes", default=",".join(REGIMES))
    _regime_args(q)
    add_train_limit(q)


def _settings_args(q) -> None:
    """``exits compare``'s options, with ``CompareSettings``' defaults (read without importing torch)."""
    d = CompareSettings.__dataclass_fields__
    q.add_argument("--epochs", type=positive_int, default=d["epochs"].default)
    q.add_argument("--label-free", action="store_true", help="train every method on the base's outputs only")
    q.add_argument("--calibrate", choices=["temperature"], help="fit a temperature per exit on calib first")
    q.add_argument("--alpha", type=finite_float, default=d["alpha"].default, help="conformal sets at coverage 1 − α")
    q.add_argument("--gate-lambda", type=finite_float, default=d["gate_lambda"].default,
                   help="λ, the weight of FLOPs in the gates' cost")
    q.add_argument("--lf-tolerance", type=finite_float, default=d["lf_tolerance"].default,
                   help="T of the label-free T/2^n threshold rule (points)")
    q.add_argument("--wallclock-images", type=int, default=d["wallclock_images"].default,
                   help="test images timed at batch 1 and 128 (0: skip)")
    add_train_limit(q)


def _regime_args(q) -> None:
    d = RegimeSettings.__dataclass_fields__
    q.add_argument("--joint-samples", type=positive_int, default=d["joint_samples"].default,
                   help="training samples of the joint regime (the zoo's own base budget by default)")
    q.add_argument("--mixed-samples", type=positive_int, default=d["mixed_samples"].default)


def _pair(args, granularity="stage"):
    from .train import Pair

    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    return zoo, Pair.from_zoo(zoo, args.saver, args.base, granularity)


def add_train_limit(q) -> None:
    q.add_argument("--train-limit", type=positive_int,
                   help="use only the first N images of each split (train, and calib and test too: a quick run)")


def check_criterion(args) -> None:
    """The criterion and tolerance checked as ``tinysaver query`` checks them, before any work."""
    if getattr(args, "criterion", None) is not None:
        SelectorConfig(criterion=args.criterion, tolerance=args.tolerance)


def cmd_train(args) -> int:
    from .train import TrainSettings, esn_splits, save_esn, train_esn

    settings = TrainSettings.from_yaml(args.config, epochs=args.epochs, num_layers=args.num_layers, dim=args.dim,
                                       train_limit=args.train_limit)
    zoo, pair = _pair(args, settings.granularity)
    train, _, _ = esn_splits(zoo, limit=settings.train_limit)
    esn = train_esn(pair, train, settings)
    save_esn(args.out, esn, pair, settings)
    print(f"ESN saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    check_criterion(args)

    from .train import Pair, load_esn

    esn, ck = load_esn(args.checkpoint, saver=args.saver, base=args.base)
    zoo = load_zoo(args.zoo or ck.zoo, Path(args.root) if args.root else None)
    pair = Pair.from_zoo(zoo, ck.saver, ck.base, ck.granularity)
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(zoo, pair, esn, args.criterion, args.tolerance, limit=args.limit)
    return 0


def cmd_grid(args) -> int:
    check_criterion(args)
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
    from .compare import CompareSettings, compare, format_rows, parse_families, plot_rows

    families = parse_families(args.methods)  # before anything loads
    settings = CompareSettings(epochs=args.epochs, label_free=args.label_free, calibrate=args.calibrate,
                               alpha=args.alpha, gate_lambda=args.gate_lambda, lf_tolerance=args.lf_tolerance,
                               wallclock_images=args.wallclock_images, train_limit=args.train_limit)
    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    rows, fronts = compare(zoo, args.saver, args.base, families, settings)
    print(format_rows(rows))
    if args.png:
        plot_rows(rows, fronts, Path(args.png), f"{zoo.name}: {args.base} ← {args.saver}")
        print(f"plot written to {args.png}")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(rows, indent=1).encode())
    return 0


def cmd_regimes(args) -> int:
    from .regimes import REGIMES, RegimeSettings, compare_regimes, format_regimes

    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    bad = sorted(set(regimes) - set(REGIMES))
    if bad or not regimes:
        raise UsageError(f"unknown regime(s) {bad or args.regimes!r}; choose from {', '.join(REGIMES)}")
    settings = RegimeSettings(joint_samples=args.joint_samples, mixed_samples=args.mixed_samples)
    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    print(format_regimes(compare_regimes(zoo, args.base, regimes, settings, args.train_limit)))
    return 0


def cmd_serve(args) -> int:
    """The saver + ESN exits + base application, with the thresholds given or chosen on calib."""
    check_criterion(args)

    from .policy import ExitPolicy, calibrated_policy
    from .serve import esn_spec, part_names
    from .train import Pair, load_esn

    need_serve()
    opts = serve_options(args)  # bad options fail before Ray starts
    esn, ck = load_esn(args.checkpoint, saver=args.saver, base=args.base)
    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    if args.thresholds:
        if args.calibrate:
            raise UsageError("--thresholds apply to uncalibrated confidences; drop --calibrate, or drop "
                             "--thresholds to choose thresholds and temperatures on calib")
        policy = ExitPolicy(list(args.thresholds))
    else:
        pair = Pair.from_zoo(zoo, ck.saver, ck.base, ck.granularity)
        policy = calibrated_policy(zoo, pair, esn, args.criterion, args.tolerance, args.delta, args.calibrate)
    names = part_names(ck.saver, ck.base, esn.num_exits)
    print("tinysaver: exits and thresholds: " + ", ".join(f"{n} ≥ {t:.4f}" for n, t in zip(names, policy.thresholds))
          + f", then {names[-1]}", file=sys.stderr)

    spec = esn_spec(args.checkpoint, zoo, policy, opts)  # validated before anything is deployed
    return run_app(application(spec, token_or_env(args.token)), names, args, replica_needs(spec))


__all__ = ["register", "cmd_train", "cmd_eval", "cmd_grid", "cmd_compare", "cmd_regimes", "cmd_serve"]
