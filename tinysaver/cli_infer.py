"""Handler of ``tinysaver infer``: classify image files, folders or tars through a cascade."""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time


def cmd_infer(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .cascade import build_cascade
    from .data import decoded_blocks, paths_source
    from .report import describe
    from .selector import SelectorConfig, selection_for
    from .zoo import load_zoo

    zoo = load_zoo(args.zoo, args.root)
    sel = selection_for(zoo, args.base, SelectorConfig.from_options(args), savers=args.saver,
                        threshold=args.threshold, selection=args.selection, from_selection=args.from_selection)
    src = paths_source(args.paths)
    if not src.ids:
        raise ValueError("no images found in the given paths (looked for .jpg, .jpeg, .png, .bmp, .webp, .gif, "
                         ".tif files, folders and .tar files)")
    if not args.quiet:
        print(describe(sel), file=sys.stderr)
    backends = args.backend.split(",")
    cascade = build_cascade(sel, zoo, device=args.device, accept_preprocess_change=args.accept_preprocess_change,
                            backend=backends[0] if len(backends) == 1 else backends,
                            backend_fallback=args.backend_fallback,
                            threads=args.threads[0] if args.threads and len(args.threads) == 1 else args.threads)
    from .runtimes import malloc_advice

    advice = malloc_advice(args.batch_size, [m.preprocess.input_size[-1] for m in cascade.stages], args.device,
                           cascade.backends)
    if advice and not args.quiet:
        print(f"tinysaver: note: {advice}", file=sys.stderr)
    names = cascade.stage_names
    counts = [0] * len(names)
    failed = 0
    writer = csv.writer(sys.stdout, lineterminator="\n") if args.format == "csv" else None
    if writer:
        writer.writerow(["path", "class", "name", "confidence", "exit_stage", "stage_name"])
    t0 = time.perf_counter()
    bar = tqdm(total=len(src.ids), desc="infer", disable=len(src.ids) < 200 or args.quiet, file=sys.stderr)
    # a few batches, and at least 256 images, per block: memory stays bounded, refill can gather
    # survivors across batches, and a pipeline is not drained and restarted every few small batches
    for index, imgs, failures in decoded_blocks(src, max(args.batch_size * 8, 256)):
        for path, why in failures:  # one bad file never stops the run
            print(f"tinysaver: cannot read {path}: {why}", file=sys.stderr)
        failed += len(failures)
        bar.update(len(index) + len(failures))
        if not imgs:
            continue
        res = cascade.predict(imgs, batch_size=args.batch_size, refill=not args.no_refill,
                              pipeline=args.pipeline)
        for path, row in zip((src.ids[i] for i in index), res.rows()):
            counts[row["exit_stage"]] += 1
            if writer:
                writer.writerow([path, row["class"], row["name"] or "", f"{row['confidence']:.6f}", row["exit_stage"],
                                 row["stage_name"]])
            else:
                print(json.dumps({"path": path, **row}))
    bar.close()
    dt = time.perf_counter() - t0
    done = sum(counts)
    summary = {"images": done, "unreadable": failed, "seconds": round(dt, 3),
               "images_per_s": round(done / dt, 2) if dt > 0 else None,
               "thresholds": sel.thresholds, "backends": cascade.backends, "pipeline": args.pipeline,
               "exit_ratio": {n: round(c / max(done, 1), 4) for n, c in zip(names, counts)}}
    print("summary: " + json.dumps(summary), file=sys.stderr)
    return 0 if done else 2
