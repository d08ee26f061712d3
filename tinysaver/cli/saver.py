"""``tinysaver saver train``: fine-tune a zoo's saver so that its confidence says when to defer to a base."""
from __future__ import annotations

import argparse

from ..defer import DeferSettings, add_to_zoo, defer_losses, train_saver
from ..zoo import load_zoo
from ._args import add_pair, add_zoo, command, finite_float, group, positive_int, root_of


def register(sub) -> None:
    ssub = group(sub, "saver", "savers trained to defer to their base", "saver_command")

    q = command(ssub, "train", cmd_saver_train,
                "fine-tune SAVER on the zoo's train split to defer to BASE; add it to the zoo as SAVER.defer-BASE")
    add_zoo(q)
    add_pair(q)
    d = _defaults()
    q.add_argument("--loss", choices=d["losses"], default=d["loss"],
                   help="gatekeeper: CE where right, toward uniform where wrong; base-aware: toward uniform only where "
                        "the base would repair the saver; esn-weighted: CE weighted by 2(1 - confidence); "
                        "cross-entropy: plain CE, the control")
    q.add_argument("--alpha", type=finite_float, action="append",
                   help=f"weight of the push toward uniform; repeat to try several, the best on the held-out part of "
                        f"train is kept (default {d['alpha']})")
    q.add_argument("--epochs", type=positive_int, default=d["epochs"])
    q.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    q.add_argument("--lr", type=finite_float, default=d["lr"])
    q.add_argument("--holdout", type=finite_float, default=d["holdout"],
                   help="share of train kept apart to choose α and stop early (calib and test are never read)")
    q.add_argument("--label-free", action="store_true", help="agreement with the base's recorded answers replaces labels")
    q.add_argument("--limit", type=positive_int, help="train on the first N train samples only (a quick run)")
    q.add_argument("--seed", type=int, default=d["seed"])
    q.add_argument("--keep-worse", action="store_true",
                   help="add the trained saver to the zoo even when it defers worse than the one it started from "
                        "on the held-out part of train")
    q.add_argument("--quiet", action="store_true")


def _defaults() -> dict:
    d = DeferSettings()
    return {"losses": list(defer_losses()), "loss": d.loss, "alpha": d.alphas[0], "epochs": d.epochs,
            "batch_size": d.batch_size, "lr": d.lr, "holdout": d.holdout, "seed": d.seed}


def cmd_saver_train(args: argparse.Namespace) -> int:
    zoo = load_zoo(args.zoo, root_of(args))
    zoo.model(args.base), zoo.model(args.saver)  # unknown names fail before any image is decoded
    settings = DeferSettings(loss=args.loss, alphas=tuple(args.alpha) if args.alpha else DeferSettings.alphas,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, holdout=args.holdout,
                             label_free=args.label_free, limit=args.limit, seed=args.seed)
    result = train_saver(zoo, args.saver, args.base, settings, progress=not args.quiet)
    compared = (f"held-out zero-loss exits {100 * result.holdout_exit_before:.1f} % before → "
                f"{100 * result.holdout_exit_after:.1f} % after (the part of train kept apart)")
    if result.holdout_exit_after < result.holdout_exit_before and not args.keep_worse:
        # an honest outcome: a fine-tuned saver that defers worse is not added as if it were an improvement
        print(f"{args.saver} trained to defer to {args.base} is worse than the saver it started from: {compared}; "
              "nothing was added to the zoo (pass --keep-worse to add it anyway)")
        return 0
    key = add_to_zoo(zoo, args.saver, args.base, result, settings, root_of(args), progress=not args.quiet)
    worse = " (worse than the saver it started from, kept as --keep-worse asked)" \
        if result.holdout_exit_after < result.holdout_exit_before else ""
    print(f"{key}: α={result.alpha:g}, epoch {result.epoch}; {compared}{worse}"
          + ("; stopped by Ctrl-C, the best weights so far were kept" if result.interrupted else ""))
    print(f"next: tinysaver query --zoo {zoo.name} --base {args.base} --saver {key}")
    return 0


__all__ = ["register", "cmd_saver_train"]
