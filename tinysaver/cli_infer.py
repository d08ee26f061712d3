"""``tinysaver infer``: classify image files, folders or tars through a cascade."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _selection(args, zoo):
    from .selector import SelectorConfig, select

    if args.saver:
        if args.threshold is None:
            raise SystemExit("--saver needs --threshold")
        return {"zoo": zoo.name, "stages": [{"model": args.saver, "threshold": args.threshold},
                                            {"model": args.base, "threshold": None}]}
    if args.selection:
        sel = json.loads(Path(args.selection).read_text())
        if sel.get("base") != args.base:
            raise SystemExit(f"{args.selection} selects for base {sel.get('base')!r}, not {args.base!r}")
        return sel
    sel, _ = select(zoo, args.base, SelectorConfig(criterion=args.criterion, tolerance=args.tolerance))
    return sel


def cmd_infer(args) -> int:
    from tqdm.auto import tqdm

    from .cascade import build_cascade
    from .data import decode_image, paths_source
    from .zoo import load_zoo

    zoo = load_zoo(args.zoo, Path(args.root) if args.root else None)
    zoo.model(args.base)
    src = paths_source(args.paths)
    if not src.ids:
        print("tinysaver: error: no images found in the given paths (looked for .jpg, .jpeg, .png, .bmp, "
              ".webp, .gif, .tif files, folders and .tar files)", file=sys.stderr)
        return 2
    sel = _selection(args, zoo)
    cascade = build_cascade(sel, zoo, device=args.device)
    names = cascade.stage_names
    out = sys.stdout
    if args.format == "csv":
        out.write("path,class,name,confidence,exit_stage,stage_name\n")
    counts = [0] * len(names)
    failed = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(src.ids), desc="infer", disable=len(src.ids) < 200 or args.quiet, file=sys.stderr)
    # decode a few batches at a time: memory stays bounded, and the cascade can refill the base's
    # batches with survivors from several input batches
    block = args.batch_size * 8
    for start in range(0, len(src.ids), block):
        ids, imgs = [], []
        for i in range(start, min(start + block, len(src.ids))):
            try:
                imgs.append(decode_image(src.read(i)))
                ids.append(src.ids[i])
            except Exception as e:  # one bad file never stops the run
                failed += 1
                print(f"tinysaver: cannot read {src.ids[i]}: {type(e).__name__}: {e}", file=sys.stderr)
        bar.update(min(block, len(src.ids) - start))
        if not imgs:
            continue
        res = cascade.predict(imgs, batch_size=args.batch_size, refill=not args.no_refill)
        for path, row in zip(ids, res.rows()):
            counts[row["exit_stage"]] += 1
            if args.format == "csv":
                name = (row["name"] or "").replace('"', '""')
                out.write(f'"{path}",{row["class"]},"{name}",{row["confidence"]:.6f},{row["exit_stage"]},{row["stage_name"]}\n')
            else:
                out.write(json.dumps({"path": path, **row}) + "\n")
    bar.close()
    dt = time.perf_counter() - t0
    done = sum(counts)
    summary = {"images": done, "unreadable": failed, "seconds": round(dt, 3),
               "images_per_s": round(done / dt, 2) if dt > 0 else None,
               "exit_ratio": {n: round(c / max(done, 1), 4) for n, c in zip(names, counts)}}
    print("summary: " + json.dumps(summary), file=sys.stderr)
    return 0 if done else 2


def register(sub) -> None:
    p = sub.add_parser("infer", help="classify images through saver → base")
    p.add_argument("paths", nargs="+", help="image files, folders or .tar files")
    p.add_argument("--zoo", default="fashion-mnist")
    p.add_argument("--base", required=True)
    p.add_argument("--saver")
    p.add_argument("--threshold", type=float)
    p.add_argument("--from-selection", action="store_true",
                   help="select the saver now with the selector (--criterion, --tolerance); the default")
    p.add_argument("--selection", help="a JSON file written by 'tinysaver query --save'")
    p.add_argument("--criterion", default="zero", choices=["zero", "bounded", "subset", "guaranteed"])
    p.add_argument("--tolerance", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-refill", action="store_true",
                   help="send each batch's survivors on at once instead of gathering full batches for the base")
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_infer)
