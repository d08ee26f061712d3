"""Handlers of ``tinysaver zoo list | show | calibrate`` and ``tinysaver profile``."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_zoo_list(args: argparse.Namespace) -> int:
    import pandas as pd

    from .report import format_table
    from .zoo import default_root, zoo_summaries

    root = Path(args.root) if args.root else default_root()
    rows = zoo_summaries(root)
    if not rows:
        print(f"no zoos in {root}")
        return 0
    print(format_table(pd.DataFrame(rows), args.format))
    return 0


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from .report import format_table
    from .zoo import load_zoo

    z = load_zoo(args.name, args.root)
    if not z.models:
        print(f"zoo {z.name} ({z.path}) has no models yet: run 'tinysaver profile' into it")
        return 0
    if args.format == "table":
        print(f"zoo {z.name}: {z.manifest.get('description', '')}".rstrip(": "))
        for s, v in z.splits.items():
            print(f"  split {s}: {v.get('samples')} samples from {v.get('source')} (fingerprint {v.get('fingerprint')})")
    print(format_table(z.table(), args.format))
    return 0


def cmd_zoo_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_zoo

    path = calibrate_zoo(args.zoo, args.model, args.fit_split, root=args.root)
    print(f"calibrated confidences written to {path}/calibration; see 'tinysaver zoo show {args.zoo}'")
    return 0


def _parse_splits(items) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, uri = it.partition("=")
        if not sep or not name or not uri:
            raise ValueError(f"--split expects NAME=DATASET (e.g. val=imagenet:images.tar), got {it!r}")
        out[name] = uri
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    from .models import ModelSpec
    from .profiler import LATENCY_SECONDS, ProfileConfig, profile, profile_latency
    from .zoo import zoo_path

    if args.latency_only:
        zoo = args.zoo or (ProfileConfig.from_yaml(args.config).zoo if args.config else None)
        if not zoo:
            raise ValueError("--latency-only needs the zoo: give --zoo NAME or --config FILE")
        path = profile_latency(zoo, [b for b in args.backends.split(",") if b], args.batch_sizes,
                               Path(args.root) if args.root else None, models=args.model, limit=args.limit,
                               min_run_time=args.latency_seconds or LATENCY_SECONDS, log=(lambda s: None) if args.quiet else print)
        print(f"latency rows added to {path}")
        return 0
    if args.config:
        cfg = ProfileConfig.from_yaml(args.config, zoo=args.zoo, limit=args.limit, device=args.device,
                                      force=args.force or None, latency_min_run_time=args.latency_seconds)
    else:
        if not (args.zoo and args.model and args.split):
            raise ValueError("give --config FILE, or --zoo, at least one --model and one --split")
        if args.checkpoint and len(args.model) != 1:
            raise ValueError("--checkpoint applies to exactly one --model; use a --config file for several")
        specs = [ModelSpec(m, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans,
                           checkpoint=args.checkpoint) for m in args.model]
        cfg = ProfileConfig(zoo=args.zoo, splits=_parse_splits(args.split), models=specs,
                            batch_sizes=args.batch_sizes, eval_batch_size=args.eval_batch_size, topk=args.topk,
                            save_logits=args.save_logits, flops_counter=args.flops_counter,
                            device=args.device or "cpu", limit=args.limit, force=args.force,
                            latency_min_run_time=args.latency_seconds or LATENCY_SECONDS)
    root = Path(args.root) if args.root else None
    if args.plan:
        from .plan import format_plan, plan_profile

        print(format_plan(plan_profile(cfg, args.gpus, args.gpu_type, root=root)))
        return 0
    if args.backend == "ray":
        from .profile_ray import profile_on_ray

        counts = profile_on_ray(cfg, root, address=args.address, shards=args.shards,
                                gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                                max_retries=args.max_retries, progress=not args.quiet,
                                log=(lambda s: None) if args.quiet else print)
        print("ray: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    else:
        profile(cfg, root, progress=not args.quiet)
    print(f"zoo written to {root / cfg.zoo if root else zoo_path(cfg.zoo)}")
    return 0
