"""The ``tinysaver`` command line. Each subcommand is a thin wrapper over the Python API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence



def _root(args: argparse.Namespace) -> Path | None:
    return Path(args.root) if getattr(args, "root", None) else None


def _print_df(df, fmt: str = "table") -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        if fmt == "markdown":
            print(_markdown(df))
        elif fmt == "csv":
            print(df.to_csv(index=False), end="")
        else:
            print(df.to_string(index=False))


def _markdown(df) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None or v != v else str(v) for v in row) + " |")
    return "\n".join(lines)


# --- zoo ---------------------------------------------------------------------------------------------

def cmd_zoo_list(args: argparse.Namespace) -> int:
    from .zoo import default_root, list_zoos, load_zoo

    root = _root(args) or default_root()
    names = list_zoos(root)
    if not names:
        print(f"no zoos in {root}")
        return 0
    rows = []
    for n in names:
        z = load_zoo(n, root)
        st = [m.get("status") for m in z.models.values()]
        rows.append({"zoo": n, "models": len(st), "measured": st.count("measured"),
                     "published": st.count("published"), "splits": ",".join(
                         f"{s}({v.get('samples')})" for s, v in z.splits.items())})
    import pandas as pd

    _print_df(pd.DataFrame(rows), args.format)
    return 0


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from .zoo import load_zoo

    z = load_zoo(args.name, _root(args))
    if args.format == "table":
        print(f"zoo {z.name}: {z.manifest.get('description', '')}".rstrip(": "))
        for s, v in z.splits.items():
            print(f"  split {s}: {v.get('samples')} samples from {v.get('source')} (fingerprint {v.get('fingerprint')})")
    _print_df(z.table(), args.format)
    return 0


# --- profile -----------------------------------------------------------------------------------------

def _parse_splits(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, uri = it.partition("=")
        if not sep or not name or not uri:
            raise SystemExit(f"--split expects NAME=DATASET (e.g. val=imagenet:images.tar), got {it!r}")
        out[name] = uri
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    from .models import ModelSpec
    from .profiler import ProfileConfig, profile

    if args.config:
        cfg = ProfileConfig.from_yaml(args.config, zoo=args.zoo, limit=args.limit, device=args.device,
                                      force=args.force or None)
    else:
        if not (args.zoo and args.model and args.split):
            raise SystemExit("give --config FILE, or --zoo, at least one --model and one --split")
        specs = [ModelSpec(m, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans,
                           checkpoint=args.checkpoint if len(args.model) == 1 else None) for m in args.model]
        if args.checkpoint and len(args.model) != 1:
            raise SystemExit("--checkpoint applies to exactly one --model; use a --config file for several")
        cfg = ProfileConfig(zoo=args.zoo, splits=_parse_splits(args.split), models=specs,
                            batch_sizes=args.batch_sizes, eval_batch_size=args.eval_batch_size, topk=args.topk,
                            save_logits=args.save_logits, flops_counter=args.flops_counter,
                            device=args.device or "cpu", limit=args.limit, force=args.force)
    path = profile(cfg, _root(args), progress=not args.quiet)
    print(f"zoo written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinysaver", description="Pick small saver models that answer easy inputs first.")
    p.add_argument("--root", help="zoo_index folder (default: $TINYSAVER_ZOO_ROOT or ./zoo_index)")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="list and show profiled zoos")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoos")
    zl.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    zl.set_defaults(func=cmd_zoo_list)
    zs = zsub.add_parser("show", help="show one zoo's models")
    zs.add_argument("name", nargs="?", default="fashion-mnist")
    zs.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    zs.set_defaults(func=cmd_zoo_show)

    pr = sub.add_parser("profile", help="profile models into a zoo (resumable)")
    pr.add_argument("--config", help="YAML with zoo, splits, models, batch_sizes, ...")
    pr.add_argument("--zoo")
    pr.add_argument("--model", action="append", help="timm/torchvision/offline name; repeat for several")
    pr.add_argument("--split", action="append", default=[], help="NAME=DATASET, e.g. val=imagenet:sample.tar")
    pr.add_argument("--checkpoint", help="local weights file for the single --model")
    pr.add_argument("--pretrained", action="store_true", help="download hub weights (needs internet)")
    pr.add_argument("--num-classes", type=int)
    pr.add_argument("--in-chans", type=int)
    pr.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    pr.add_argument("--eval-batch-size", type=int, default=64)
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--save-logits", action="store_true")
    pr.add_argument("--flops-counter", choices=["deepspeed", "torch"], default="deepspeed")
    pr.add_argument("--device")
    pr.add_argument("--limit", type=int, help="first N samples per split")
    pr.add_argument("--force", action="store_true",
                    help="re-measure finished models (FLOPs, latency); prediction files are reused")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_profile)

    _add_later_commands(sub)
    return p


def _add_later_commands(sub) -> None:
    """Selector, cascade and ESN commands register here (kept apart to keep imports lazy)."""
    from . import cli_select

    cli_select.register(sub)
    try:  # the ESN ships in the same distribution; keep the CLI usable if it is absent
        from esn import cli as esn_cli
    except ImportError:
        return
    esn_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tinysaver: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
