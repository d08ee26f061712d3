"""``tinysaver select``: the whole-zoo table, the best saver of every base."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..report import format_table, markdown
from ..selector import SelectorConfig, select_all
from ..zoo import atomic_write_bytes, load_zoo
from ._args import add_selector_args, command


def register(sub) -> None:
    q = command(sub, "select", cmd_select, "whole-zoo table: best saver of every base")
    add_selector_args(q)
    q.add_argument("--out", help="path stem for the .csv and .md tables")


def cmd_select(args: argparse.Namespace) -> int:
    _, table = select_all(load_zoo(args.zoo, args.root), SelectorConfig.from_options(args))
    print(format_table(table))
    if args.out:
        out = Path(args.out)
        atomic_write_bytes(out.with_suffix(".csv"), table.to_csv(index=False).encode())
        atomic_write_bytes(out.with_suffix(".md"), (markdown(table) + "\n").encode())
        print(f"written {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


__all__ = ["register", "cmd_select"]
