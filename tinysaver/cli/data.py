"""``tinysaver data sample``: write a few labelled images of a dataset as PNG files, to try ``infer`` on."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import sample_images
from ..sources import SOURCES
from ..zoo import DEFAULT_ZOO
from ._args import command, group, positive_int


def register(sub) -> None:
    dsub = group(sub, "data", "get images to try tinysaver on", "data_command")
    q = command(dsub, "sample", cmd_sample,
                "write N images of a dataset as PNG files named <index>_<label>.png (seeded, never overwriting)")
    q.add_argument("dataset", nargs="?", default=DEFAULT_ZOO,
                   help="a dataset URI (fashion-mnist[:SPLIT], imagenet:PATH, imagefolder:PATH, foolbox)")
    q.add_argument("--out", required=True, help="folder to write into (created; existing files are never replaced)")
    q.add_argument("-n", type=positive_int, default=20, help="how many images")
    q.add_argument("--seed", type=int, default=0, help="which images: a seeded random choice")


def cmd_sample(args: argparse.Namespace) -> int:
    written = sample_images(args.dataset, Path(args.out), args.n, args.seed)
    kind = args.dataset.partition(":")[0]
    known = SOURCES.get(kind).zoo if kind in SOURCES else None
    if known:
        zoo, base = known
        print(f"{len(written)} images written to {args.out}; classify them with:\n"
              f"  tinysaver infer --zoo {zoo} --base {base} {args.out}")
    else:  # an image folder's classes are its own: only a zoo profiled on them knows them
        print(f"{len(written)} images written to {args.out}; classify them with a zoo profiled on {args.dataset}:\n"
              f"  tinysaver infer --zoo ZOO --base BASE {args.out}")
    return 0


__all__ = ["register", "cmd_sample"]
