"""``tinysaver zoo list | show | calibrate``: see the profiled zoos, and fit temperatures into one."""
from __future__ import annotations

import argparse
import sys

from ..zoo import DEFAULT_ZOO
from ._args import add_zoo, command, group, root_of

FORMATS = ("table", "markdown", "csv")


def register(sub) -> None:
    zsub = group(sub, "zoo", "list and show profiled zoos", "zoo_command")
    q = command(zsub, "list", cmd_zoo_list, "list zoos")
    q.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    q = command(zsub, "show", cmd_zoo_show, "show one zoo's models")
    q.add_argument("name", nargs="?", default=DEFAULT_ZOO)
    q.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    q = command(zsub, "calibrate", cmd_zoo_calibrate,
                "fit a temperature per model; store calibrated confidences and ECE before/after")
    add_zoo(q)
    q.add_argument("--model", action="append", help="only these models (repeat); default: every measured model")
    q.add_argument("--fit-split", default="calib", help="labelled split the temperatures are fitted on")


def cmd_zoo_list(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..report import format_table
    from ..zoo import default_root, zoo_summaries

    root = root_of(args) or default_root()
    rows = zoo_summaries(root)
    if not rows:
        print(f"no zoos in {root}")
        return 0
    print(format_table(pd.DataFrame(rows), args.format))
    return 0


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from ..report import format_table
    from ..zoo import load_zoo

    z = load_zoo(args.name, args.root)
    if not z.models:
        print(f"zoo {z.name} ({z.path}) has no models yet: run 'tinysaver profile' into it")
        return 0
    if args.format == "table":
        print(f"zoo {z.name}: {z.manifest.get('description', '')}".rstrip(": "))
        for s, v in z.splits.items():
            print(f"  split {s}: {v.get('samples')} samples from {v.get('source')} (fingerprint {v.get('fingerprint')})")
    table = z.table()
    print(format_table(table, args.format))
    if "noisy" in table and table["noisy"].notna().any():
        print("tinysaver: warning: latency in the 'noisy' column was timed on a busy machine; re-time it with "
              f"'tinysaver profile --latency-only --noisy-only --zoo {z.name} --backends …'", file=sys.stderr)
    return 0


def cmd_zoo_calibrate(args: argparse.Namespace) -> int:
    from ..calibration import calibrate_zoo

    path = calibrate_zoo(args.zoo, args.model, args.fit_split, root=args.root)
    print(f"calibrated confidences written to {path}/calibration; see 'tinysaver zoo show {args.zoo}'")
    return 0
