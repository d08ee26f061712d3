"""``tinysaver plot``: accuracy against early-exit ratio, and the cost/accuracy Pareto front (PNG)."""
from __future__ import annotations

import argparse

from ..plots import plot_pair
from ..selector import SelectorConfig
from ..zoo import load_zoo
from ._args import add_pair, add_selector_args, command


def register(sub) -> None:
    q = command(sub, "plot", cmd_plot, "accuracy vs early-exit ratio and the cost/accuracy Pareto front (PNG)")
    add_selector_args(q)
    add_pair(q)
    q.add_argument("--out", default="tinysaver-plot.png")


def cmd_plot(args: argparse.Namespace) -> int:
    path = plot_pair(load_zoo(args.zoo, args.root), args.base, args.saver, args.out, SelectorConfig.from_options(args))
    print(f"plot written to {path}")
    return 0


__all__ = ["register", "cmd_plot"]
