"""``tinysaver zoo list | show | calibrate | import``: see the zoos, fit temperatures into one, and
build one from predictions made elsewhere."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import pandas as pd

from ..errors import UsageError
from ..importer import import_zoo, read_class_names
from ..report import format_table
from ..zoo import DEFAULT_ZOO, default_root, load_zoo, search_path, zoo_summaries
from ._args import add_zoo, command, group, positive_int, root_of

FORMATS = ("table", "markdown", "csv")
NARROW = 100  # characters a default `zoo show` table fits in


def register(sub) -> None:
    zsub = group(sub, "zoo", "list and show profiled zoos", "zoo_command")
    q = command(zsub, "list", cmd_zoo_list, "list zoos")
    q.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    q.add_argument("--paths", action="store_true", help="print where zoos are looked for (first match wins) and "
                                                         "where they are written")
    q = command(zsub, "show", cmd_zoo_show, "show one zoo's models")
    q.add_argument("name", nargs="?", default=DEFAULT_ZOO)
    q.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    q.add_argument("--wide", action="store_true",
                   help=f"every column (a table shows the main ones within {NARROW} characters; csv and markdown "
                        "always give all)")
    q = command(zsub, "calibrate", cmd_zoo_calibrate,
                "fit a temperature per model; store calibrated confidences and ECE before/after")
    add_zoo(q)
    q.add_argument("--model", action="append", help="only these models (repeat); default: every measured model")
    q.add_argument("--fit-split", default="calib", help="labelled split the temperatures are fitted on")
    q = command(zsub, "import", cmd_zoo_import,
                "build a zoo from predictions made elsewhere: {model}_{split}.npz (official TinySaver records: label, "
                "preds, confs; or logits), .npy logits, or .csv (id,pred,conf[,label])")
    q.add_argument("name", help="the new zoo's name (under --root)")
    q.add_argument("files", nargs="+", help="record files, one per model and split, or folders holding them")
    costs = q.add_mutually_exclusive_group(required=True)
    costs.add_argument("--costs", help="CSV: model and gmacs (or macs, gflops, flops), optionally params_m")
    costs.add_argument("--costs-from", metavar="ZOO",
                       help="take each model's MACs/FLOPs/params from this zoo's entry of the same timm name "
                            "(e.g. imagenet-catalog)")
    q.add_argument("--num-classes", type=positive_int, help="default: the logits' width, else the largest class + 1")
    q.add_argument("--class-names", help="a text file, one class name per line")
    q.add_argument("--weights", action="append", default=[], metavar="MODEL=TIMM_NAME",
                   help="the timm name (with its pretrained tag) whose hub weights made MODEL's predictions, so "
                        "that infer and serve can run it (repeat)")
    q.add_argument("--description", default="")
    q.add_argument("--force", action="store_true", help="replace a zoo of that name")


def cmd_zoo_list(args: argparse.Namespace) -> int:
    root = root_of(args)
    if args.paths:  # the search path, first match wins, and where writes go
        for label, place in search_path(root):
            print(f"{label:>20}  {place}{'' if place.is_dir() else '  (none yet)'}")
        print(f"{'writes go to':>20}  {default_root(root)}")
        return 0
    rows = zoo_summaries(root)
    if not rows:
        print("no zoos in " + ", ".join(str(p) for _, p in search_path(root)))
        return 0
    print(format_table(pd.DataFrame(rows), args.format))
    return 0


def cmd_zoo_show(args: argparse.Namespace) -> int:
    z = load_zoo(args.name, args.root)
    if not z.models:
        print(f"zoo {z.name} ({z.path}) has no models yet: run 'tinysaver profile' into it")
        return 0
    if args.format == "table":
        head = f"zoo {z.name}: {z.manifest.get('description', '')}".rstrip(": ")
        print(head if args.wide else textwrap.fill(head, NARROW, subsequent_indent="  "))
        for s, v in z.splits.items():
            line = f"  split {s}: {v.get('samples')} samples from {v.get('source')} (fingerprint {v.get('fingerprint')})"
            print(line if args.wide else textwrap.fill(line, NARROW, subsequent_indent="    "))
    table = z.table()
    if args.format == "table" and not args.wide:
        shown, hidden = narrow(table, NARROW)
        print(format_table(shown, args.format))
        if hidden:
            print(f"({hidden} more columns: --wide, or --format csv)")
    else:
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


def cmd_zoo_import(args: argparse.Namespace) -> int:
    files = []
    for f in map(Path, args.files):
        if f.is_dir():  # a folder: every record file in it
            found = sorted(p for p in f.iterdir() if p.suffix.lower() in (".npz", ".npy", ".csv"))
            if not found:
                raise UsageError(f"{f}: no .npz, .npy or .csv record files in it")
            files += found
        else:
            files.append(f)
    weights = {}
    for w in args.weights:
        model, sep, name = w.partition("=")
        if not sep or not model or not name:
            raise UsageError(f"--weights takes MODEL=TIMM_NAME, got {w!r}")
        weights[model] = name
    names = None
    if args.class_names:
        names = read_class_names(args.class_names)
    path = import_zoo(args.name, files, costs=args.costs, costs_from=args.costs_from, root=root_of(args),
                      num_classes=args.num_classes, class_names=names, weights=weights, description=args.description,
                      force=args.force)
    zoo = load_zoo(str(path))
    largest = max(zoo.models, key=lambda k: zoo.entry(k).flops)
    print(f"zoo {args.name!r} written to {path}: {len(zoo.models)} models, splits {', '.join(zoo.splits)}; "
          f"try 'tinysaver query --zoo {args.name} --base {largest}'")
    return 0


def narrow(table, width: int):
    """The table cut to its main columns (model, status, input size, cost, two top-1 columns with
    test first, batch-1 latency), the least wanted dropped until its text fits in ``width``
    characters; returns it and how many columns it leaves out."""
    top1 = sorted((c for c in table.columns if c.startswith("top1_")), key=lambda c: ("test" not in c, c))
    # kept first to last: the model, its best top-1, its cost, then the rest while they fit
    wanted = ["model", *top1[:1], "GFLOPs", "params_M", "status", "input_px", *top1[1:2], "ms_bs1"]
    keep = [c for c in wanted if c in table.columns]
    while len(keep) > 1 and max(map(len, format_table(table[_in_order(table, keep)], "table").splitlines())) > width:
        keep.pop()
    return table[_in_order(table, keep)], len(table.columns) - len(keep)


def _in_order(table, names: list[str]) -> list[str]:
    return [c for c in table.columns if c in names]


__all__ = ["FORMATS", "NARROW", "register", "cmd_zoo_list", "cmd_zoo_show", "cmd_zoo_calibrate",
           "cmd_zoo_import", "narrow"]
