"""``tinysaver infer``: classify image files, folders or tars through a cascade; one CSV/JSONL row each."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from ..backends import DEFAULT_BACKEND
from ..budget import InputBudget
from ..errors import UsageError
from ..limits import MAX_PIXELS
from ..report import describe
from ..selector import PolicyRequest, selection_for
from ..stageplan import DEFAULT_BATCH_SIZE, resolve
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


def torch_threads(given: list[int] | None, say=None) -> int:
    """The thread count of torch's pool (eager stages): ``--threads`` when one number is given, else
    the cores this process may use (``os.sched_getaffinity``), or 1 on a machine already busier than
    that: measured on a loaded 2-core machine, torch's default ran at 19-46 img/s against about 800 on
    one thread. The choice is said once on ``say`` (a stream) when the machine was busy."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if given and len(given) == 1:
        n = given[0]
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        n = 1 if load >= cores else cores
        if n < cores and say is not None:
            print(f"tinysaver: note: the machine is busy (load {load:.1f} on {cores} cores), so eager stages run "
                  "on 1 thread; give --threads N to choose", file=say)
    if not given or len(given) == 1:
        torch.set_num_threads(n)
    return n


def cmd_infer(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..cascade import Cascade, FileTally, classify_files
    from ..runtimes import malloc_advice
    from ..sources import paths_source

    zoo = load_zoo(args.zoo, args.root)
    request = PolicyRequest.from_options(args)
    sel = selection_for(zoo, request)
    threads = torch_threads(args.threads, None if args.quiet else sys.stderr)
    plan = resolve(sel, zoo, backend=args.backend, device=args.device, batch_size=args.batch_size,
                   backend_fallback=args.backend_fallback, accept_preprocess_change=args.accept_preprocess_change,
                   threads=threads if args.threads is None or len(args.threads) == 1 else args.threads)
    src = paths_source(args.paths)
    for why in src.skipped:  # unreadable folders and non-files: counted, never silent
        print(f"tinysaver: skipped {why}", file=sys.stderr)
    for link in src.followed:
        print(f"tinysaver: note: followed the link {link}", file=sys.stderr)
    if not src.ids:
        raise UsageError("no images found in the given paths (looked for .jpg, .jpeg, .png, .bmp, .webp, .gif, "
                         ".tif files, folders and .tar files)")
    if not args.quiet:
        print(describe(sel), file=sys.stderr)
    cascade = Cascade.from_plan(plan, zoo=zoo)
    advice = malloc_advice(args.batch_size, [m.preprocess.input_size[-1] for m in cascade.stages], args.device,
                           cascade.backends)
    if advice and not args.quiet:
        print(f"tinysaver: note: {advice}", file=sys.stderr)
    # an image is refused from its header when it, or any stage's resize of it, is over --max-pixels
    budget = InputBudget(args.max_pixels, plan.preprocess)
    writer = csv.writer(sys.stdout, lineterminator="\n") if args.format == "csv" else None
    if writer:
        writer.writerow(["path", "class", "name", "confidence", "exit_stage", "stage_name"])
    # the bar counts answered images (and unreadable ones), not decoded ones: decoding runs ahead
    bar = tqdm(total=len(src.ids), desc="infer", unit="img", disable=len(src.ids) < 200 or args.quiet,
               file=sys.stderr)
    tally = FileTally(cascade.stage_names)
    for path, row in classify_files(cascade, src, budget, args.batch_size, refill=not args.no_refill,
                                    pipeline=args.pipeline, tally=tally):
        bar.update(1)
        if isinstance(row, str):
            print(f"tinysaver: cannot read {path}: {row}", file=sys.stderr)
        elif writer:
            writer.writerow([path, row["class"], row["name"] or "", f"{row['confidence']:.6f}", row["exit_stage"],
                             row["stage_name"]])
        else:
            print(json.dumps({"path": path, **row}))
    bar.close()
    summary = {**tally.summary(), "skipped": len(src.skipped), "links_followed": len(src.followed),
               "thresholds": sel.thresholds, "backends": cascade.backends, "pipeline": args.pipeline}
    print("summary: " + json.dumps(summary), file=sys.stderr)
    done = tally.answered
    return 0 if done else 2


__all__ = ["register", "torch_threads", "cmd_infer"]
