"""``tinysaver profile``: fill a zoo with FLOPs, latency and per-sample predictions (resumable)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import BACKENDS
from ..errors import UsageError
from ..limits import MAX_PIXELS

EXECUTORS = ("local", "ray")  # where profiling units run
from ..yamlfile import named_config
from ..zoo import bundled_root, write_path
from ._args import add_zoo, command, int_list, positive_float, positive_int, root_of

# What Ctrl-C prints: every finished model and shard is on disk, so the same command carries on.
INTERRUPTED = "interrupted; rerun the same command to resume"


def profile_config(text: str) -> Path:
    """``--config``: a path, or a packaged config's name (the bundled zoo_index's ``configs/``)."""
    try:
        return named_config(text, bundled_root() / "configs", "packaged profile config")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    q = command(sub, "profile", cmd_profile, "profile models into a zoo (resumable)")
    q.set_defaults(interrupted=INTERRUPTED)
    q.add_argument("--config", type=profile_config,
                   help="YAML with zoo, splits, models, batch_sizes, ...: a path, or the name of a packaged one "
                        "(fashion-mnist, imagenet-lite, imagenet-paper-pool)")
    add_zoo(q, default=None, help_="zoo name (in --root) or folder (default: the config's zoo)")
    q.add_argument("--model", action="append", help="timm/torchvision/offline name; repeat for several")
    q.add_argument("--split", action="append", default=[], help="NAME=DATASET, e.g. val=imagenet:sample.tar")
    q.add_argument("--checkpoint", help="local weights file for the single --model")
    q.add_argument("--pretrained", action="store_true", help="download hub weights (needs internet)")
    q.add_argument("--num-classes", type=positive_int)
    q.add_argument("--in-chans", type=positive_int)
    q.add_argument("--batch-sizes", type=int_list, nargs="+", default=[1, 32],
                   help="latency batch sizes, e.g. 1 32 128 or 1,32,128")
    q.add_argument("--eval-batch-size", type=positive_int, default=64)
    q.add_argument("--topk", type=positive_int, default=5)
    q.add_argument("--save-logits", action="store_true")
    q.add_argument("--flops-counter", choices=["deepspeed", "torch"], default="deepspeed")
    q.add_argument("--device")
    q.add_argument("--limit", type=positive_int, help="first N samples per split")
    q.add_argument("--max-pixels", type=positive_int,
                   help=f"skip (and count) images with more pixels (width × height), read from the header "
                        f"(default: the config's max_pixels, else {MAX_PIXELS:,})")
    q.add_argument("--force", action="store_true",
                   help="re-measure finished models (FLOPs, latency); prediction files are reused")
    q.add_argument("--restart", action="store_true",
                   help="forget the zoo's profiled splits and models and profile it again from scratch (a resumed "
                        "run on other data or model settings stops and says so)")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--latency-seconds", type=positive_float,
                   help="least measuring time per model, backend and batch size (torch.utils.benchmark's "
                        "min_run_time; default: the config's latency_min_run_time, else 0.5)")
    q.add_argument("--latency-only", action="store_true",
                   help="add latency rows per --backends to an existing zoo (--zoo or --config); predictions untouched")
    q.add_argument("--noisy-only", action="store_true",
                   help="with --latency-only: re-time only the rows stored as noisy (timed on a busy machine)")
    q.add_argument("--backends", default=BACKENDS[0],
                   help=f"with --latency-only: comma-separated {', '.join(BACKENDS)}")
    q.add_argument("--executor", choices=EXECUTORS, default=EXECUTORS[0],
                   help="where the units run: here, or on a Ray cluster (predictions and FLOPs; latency stays "
                        "local). Not a model runtime: see --backends")
    # the old name of --executor, refused with a hint; kept as an option so that argparse does not
    # take it for an abbreviation of --backends, the model runtimes
    q.add_argument("--backend", dest="old_executor", help=argparse.SUPPRESS)
    q.add_argument("--address", help="with --executor ray: the cluster to join (default: $RAY_ADDRESS, else local)")
    q.add_argument("--shards", type=positive_int, default=4, help="with --executor ray: shards per split")
    q.add_argument("--gpus-per-task", type=float, default=0.0, help="with --executor ray: GPUs per model actor")
    q.add_argument("--cpus-per-task", type=float, default=1.0, help="with --executor ray: CPUs per model actor")
    q.add_argument("--max-retries", type=int, default=3,
                   help="with --executor ray: replacements per lost worker (its unit always runs again)")
    q.add_argument("--cost", "--plan", dest="cost", action="store_true",
                   help="print the expected wall time and GPU-hours of the config, run nothing "
                        "(--plan is its old name)")
    q.add_argument("--gpus", type=positive_int, default=1, help="with --cost: GPUs to cost it for")
    q.add_argument("--gpu-type", default="rtx4090",
                   help="with --cost: the device whose published timm benchmark to use")


def _parse_splits(items) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, uri = it.partition("=")
        if not sep or not name or not uri:
            raise UsageError(f"--split expects NAME=DATASET (e.g. val=imagenet:images.tar), got {it!r}")
        out[name] = uri
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    from ..models import ModelSpec
    from ..profiler import LATENCY_SECONDS, ProfileConfig, profile, profile_latency

    if args.old_executor is not None:
        raise UsageError(f"profile --backend {args.old_executor} is now --executor {args.old_executor} (local or ray); "
                         "--backends names the model runtimes of --latency-only")
    root = root_of(args)
    batch_sizes = [b for part in args.batch_sizes for b in (part if isinstance(part, list) else [part])]
    if args.noisy_only and not args.latency_only:
        raise UsageError("--noisy-only re-times stored rows: give it with --latency-only")
    if args.latency_only:
        zoo = args.zoo or (ProfileConfig.from_yaml(args.config).zoo if args.config else None)
        if not zoo:
            raise UsageError("--latency-only needs the zoo: give --zoo NAME or --config FILE")
        path = profile_latency(zoo, [b for b in args.backends.split(",") if b], batch_sizes, root,
                               models=args.model, limit=args.limit,
                               min_run_time=args.latency_seconds or LATENCY_SECONDS,
                               log=(lambda s: None) if args.quiet else print, noisy_only=args.noisy_only)
        print(f"latency rows added to {path}")
        return 0
    if args.config:
        cfg = ProfileConfig.from_yaml(args.config, zoo=args.zoo, limit=args.limit, device=args.device,
                                      force=args.force or None, restart=args.restart or None, latency_min_run_time=args.latency_seconds,
                                      max_pixels=args.max_pixels)
    else:
        if not (args.zoo and args.model and args.split):
            raise UsageError("give --config FILE, or --zoo, at least one --model and one --split")
        if args.checkpoint and len(args.model) != 1:
            raise UsageError("--checkpoint applies to exactly one --model; use a --config file for several")
        specs = [ModelSpec(m, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans,
                           checkpoint=args.checkpoint) for m in args.model]
        cfg = ProfileConfig(zoo=args.zoo, splits=_parse_splits(args.split), models=specs,
                            batch_sizes=batch_sizes, eval_batch_size=args.eval_batch_size, topk=args.topk,
                            save_logits=args.save_logits, flops_counter=args.flops_counter,
                            device=args.device or "cpu", limit=args.limit, force=args.force, restart=args.restart,
                            latency_min_run_time=args.latency_seconds or LATENCY_SECONDS,
                            max_pixels=args.max_pixels or MAX_PIXELS)
    if args.cost:
        from ..profile_cost import format_profile_cost, profile_cost

        print(format_profile_cost(profile_cost(cfg, args.gpus, args.gpu_type, root=root)))
        return 0
    if args.executor == "ray":
        from ..profile_ray import profile_on_ray

        counts = profile_on_ray(cfg, root, address=args.address, shards=args.shards,
                                gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                                max_retries=args.max_retries, progress=not args.quiet,
                                log=(lambda s: None) if args.quiet else print)
        print("ray: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    else:
        profile(cfg, root, progress=not args.quiet)
    print(f"zoo written to {write_path(cfg.zoo, root)}")
    return 0


__all__ = ["EXECUTORS", "INTERRUPTED", "profile_config", "register", "cmd_profile"]
