"""Handlers of ``tinysaver query | select | plot``."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_query(args: argparse.Namespace) -> int:
    from .report import describe, format_table
    from .selector import SelectorConfig, select
    from .zoo import load_zoo

    zoo = load_zoo(args.zoo, args.root)
    sel, table = select(zoo, args.base, SelectorConfig.from_options(args), savers=args.saver, top=args.top)
    print(describe(sel))
    if len(table) > 1:
        print("\nnext best candidates (calibration split):")
        print(format_table(table.iloc[1:]))
    if args.save:
        sel.save(args.save)
        print(f"selection saved to {args.save}; run it with: tinysaver infer --zoo {args.zoo} --base {args.base} "
              f"--selection {args.save} IMAGES...")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from .report import format_table, markdown
    from .selector import SelectorConfig, select_all
    from .zoo import atomic_write_bytes, load_zoo

    _, table = select_all(load_zoo(args.zoo, args.root), SelectorConfig.from_options(args))
    print(format_table(table))
    if args.out:
        out = Path(args.out)
        atomic_write_bytes(out.with_suffix(".csv"), table.to_csv(index=False).encode())
        atomic_write_bytes(out.with_suffix(".md"), (markdown(table) + "\n").encode())
        print(f"written {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_pair
    from .selector import SelectorConfig
    from .zoo import load_zoo

    path = plot_pair(load_zoo(args.zoo, args.root), args.base, args.saver, args.out, SelectorConfig.from_options(args))
    print(f"plot written to {path}")
    return 0
