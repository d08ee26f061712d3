"""``tinysaver infer``: classify image files, folders or tars through a cascade; one CSV/JSONL row each."""
from __future__ import annotations

import argparse
import json
import sys

from ..backends import DEFAULT_BACKEND
from ..infer import open_files
from ..limits import MAX_PIXELS
from ..selector import PolicyRequest
from ..stageplan import DEFAULT_BATCH_SIZE
from ..zoo import load_zoo
from ._args import add_cascade_args, command, int_list, positive_int


def register(sub) -> None:
    q = command(sub, "infer", cmd_infer, "classify images through saver → base")
    q.add_argument("paths", nargs="+", help="image files, folders or .tar files")
    add_cascade_args(q)
    q.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="images per model batch")
    q.add_argument("--no-refill", action="store_true",
                   help="send each batch's survivors on at once instead of gathering full batches for the base")
    q.add_argument("--pipeline", action="store_true",
                   help="run each later stage in its own thread, so the saver works on the next batch while the "
                        "base works on survivors (more images/s; give each stage fewer --threads)")
    q.add_argument("--backend-fallback", choices=[DEFAULT_BACKEND],
                   help=f"run a stage whose export fails on {DEFAULT_BACKEND} instead of stopping")
    q.add_argument("--threads", type=int_list,
                   help="threads: one number for every stage (torch's pool for eager stages too), or one per "
                        "onnxruntime/openvino stage, e.g. 1,2 (default: the cores this process may use; 1 on a busy "
                        "machine, said)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS,
                   help="skip (and count) images with more pixels (width × height), or that a stage's resize would make "
                        "larger than that, read from the header")
    q.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    q.add_argument("--quiet", action="store_true")


def cmd_infer(args: argparse.Namespace) -> int:
    run = open_files(load_zoo(args.zoo, args.root), PolicyRequest.from_options(args), args.paths,
                     backend=args.backend, device=args.device, batch_size=args.batch_size, threads=args.threads,
                     backend_fallback=args.backend_fallback, accept_preprocess_change=args.accept_preprocess_change,
                     max_pixels=args.max_pixels, refill=not args.no_refill, pipeline=args.pipeline)
    for line in run.warnings + ([] if args.quiet else run.notes):
        print(f"tinysaver: {line}", file=sys.stderr)
    answered = run.write(sys.stdout, args.format, sys.stderr, progress=not args.quiet)
    print("summary: " + json.dumps(run.summary()), file=sys.stderr)
    return 0 if answered else 2


__all__ = ["register", "cmd_infer"]
