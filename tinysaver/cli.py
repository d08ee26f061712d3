"""The ``tinysaver`` command line: every command is registered here.

Handlers live in ``cli_zoo``, ``cli_select``, ``cli_infer`` and ``esn.cli``; each only parses,
calls the library and prints, and none imports another. Handlers are named by string and
imported on use, so ``tinysaver --help`` and ``tinysaver query`` do not load torch.
Library defaults are the command-line defaults (``SelectorConfig``'s fields are read here).
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from typing import Sequence

from . import __version__
from .policy import CRITERIA


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (argparse's own formatter skips options without help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "%(default)" not in text and action.option_strings and not (d is None or d is False or d == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text.strip()


def _fill_help(parser: argparse.ArgumentParser) -> None:
    """argparse prints nothing for an option without help, default included: give each one a line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _fill_help(sub)
        elif action.help is None and action.option_strings and action.default is not None \
                and action.default is not False and action.default != argparse.SUPPRESS:
            action.help = "(default: %(default)s)"


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def int_list(text: str) -> list[int]:
    """'1,32,128' or '1' → [1, 32, 128] / [1]; each ≥ 1."""
    return [positive_int(t) for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    """'0.9,0.8,inf' → [0.9, 0.8, inf]."""
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _flatten(args: argparse.Namespace, name: str) -> None:
    v = getattr(args, name, None)
    if v and isinstance(v[0], list):
        setattr(args, name, [x for part in v for x in part])


def _handler(path: str):
    def run(args: argparse.Namespace) -> int:
        module, _, name = path.partition(":")
        return getattr(import_module(module), name)(args)
    return run


def _selector_defaults():
    from .selector import SelectorConfig

    return SelectorConfig()


def _serve_defaults():
    from .serve import ServeOptions

    return ServeOptions()


def _add_cascade_args(q: argparse.ArgumentParser) -> None:
    """What infer and serve share: the selection (made now, read from a file, or given by hand) and
    the backends its stages run on."""
    _add_selector_args(q)
    q.add_argument("--base", required=True)
    how = q.add_mutually_exclusive_group()
    how.add_argument("--from-selection", action="store_true",
                     help="run the selector now with the selector options (what happens without --selection/--threshold)")
    how.add_argument("--selection", help="a JSON file written by 'tinysaver query --save'")
    how.add_argument("--threshold", type=float, help="the --saver's threshold, given by hand")
    q.add_argument("--saver", action="append",
                   help="with --threshold: that saver; alone: restrict the selector to these savers")
    q.add_argument("--accept-preprocess-change", action="store_true",
                   help="run a model whose current timm data config differs from the one the zoo recorded")
    q.add_argument("--backend", default="eager",
                   help="eager, compile, onnxruntime or openvino: one for all stages, or one per stage, comma-separated")


def _add_selector_args(p: argparse.ArgumentParser) -> None:
    d = _selector_defaults()
    p.add_argument("--zoo", default="fashion-mnist", help="zoo name (in --root) or folder")
    p.add_argument("--criterion", choices=CRITERIA, default=d.criterion)
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="ε, allowed accuracy loss in points (1.0 = 1%%)")
    p.add_argument("--delta", type=float, default=d.delta, help="δ of the guaranteed criterion")
    p.add_argument("--guarantee-method", choices=["wsr", "clopper-pearson"], default=d.guarantee_method,
                   help="the test behind the guaranteed criterion")
    p.add_argument("--cost", default=d.cost,
                   help="flops or latency:DEVICE:bsN[:BACKEND], e.g. latency:cpu:bs1 or latency:cpu:bs1:onnxruntime")
    p.add_argument("--label-free", action="store_true", help="use agreement with the base instead of labels")
    p.add_argument("--calibrate", choices=["temperature"], default=d.calibrate,
                   help="choose thresholds on temperature-scaled confidences (run 'tinysaver zoo calibrate' first)")
    p.add_argument("--max-stages", type=int, choices=[2, 3], default=d.max_stages,
                   help="3 also searches chains of two savers")
    p.add_argument("--calib-split", help="split to select on (default: calib, or half of the only split)")
    p.add_argument("--test-split", help="held-out split to report on (default: test, or the other half)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the half/half split when the zoo has one split")


def build_parser() -> argparse.ArgumentParser:
    # --root is accepted before or after the subcommand
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--root", default=argparse.SUPPRESS,
                      help="zoo_index folder (default: $TINYSAVER_ZOO_ROOT or ./zoo_index)")
    p = argparse.ArgumentParser(prog="tinysaver", formatter_class=_Help,
                                description="Pick small saver models that answer easy inputs first.")
    p.add_argument("--version", action="version", version=f"tinysaver {__version__}")
    p.add_argument("--root", default=None, help="zoo_index folder (default: $TINYSAVER_ZOO_ROOT or ./zoo_index)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(parent, name, handler, help_):
        q = parent.add_parser(name, help=help_, description=help_, formatter_class=_Help, parents=[root])
        q.set_defaults(func=_handler(handler))
        return q

    zoo = sub.add_parser("zoo", help="list and show profiled zoos")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    q = cmd(zsub, "list", "tinysaver.cli_zoo:cmd_zoo_list", "list zoos")
    q.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    q = cmd(zsub, "show", "tinysaver.cli_zoo:cmd_zoo_show", "show one zoo's models")
    q.add_argument("name", nargs="?", default="fashion-mnist")
    q.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    q = cmd(zsub, "calibrate", "tinysaver.cli_zoo:cmd_zoo_calibrate",
            "fit a temperature per model; store calibrated confidences and ECE before/after")
    q.add_argument("--zoo", default="fashion-mnist")
    q.add_argument("--model", action="append", help="only these models (repeat); default: every measured model")
    q.add_argument("--fit-split", default="calib", help="labelled split the temperatures are fitted on")

    q = cmd(sub, "profile", "tinysaver.cli_zoo:cmd_profile", "profile models into a zoo (resumable)")
    q.add_argument("--config", help="YAML with zoo, splits, models, batch_sizes, ...")
    q.add_argument("--zoo")
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
    q.add_argument("--force", action="store_true",
                   help="re-measure finished models (FLOPs, latency); prediction files are reused")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--latency-seconds", type=positive_float,
                   help="least measuring time per model, backend and batch size (torch.utils.benchmark's "
                        "min_run_time; default: the config's latency_min_run_time, else 0.5)")
    q.add_argument("--latency-only", action="store_true",
                   help="add latency rows per --backends to an existing zoo (--zoo or --config); predictions untouched")
    q.add_argument("--backends", default="eager",
                   help="with --latency-only: comma-separated eager, compile, onnxruntime, openvino")
    q.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: model × shard units on a Ray cluster (predictions and FLOPs; latency stays local)")
    q.add_argument("--address", help="with --backend ray: the cluster to join (default: $RAY_ADDRESS, else local)")
    q.add_argument("--shards", type=positive_int, default=4, help="with --backend ray: shards per split")
    q.add_argument("--gpus-per-task", type=float, default=0.0, help="with --backend ray: GPUs per model actor")
    q.add_argument("--cpus-per-task", type=float, default=1.0, help="with --backend ray: CPUs per model actor")
    q.add_argument("--max-retries", type=int, default=3, help="with --backend ray: restarts of a killed actor")
    q.add_argument("--plan", action="store_true",
                   help="print the expected wall time and GPU-hours of the config, run nothing")
    q.add_argument("--gpus", type=positive_int, default=1, help="with --plan: GPUs to plan for")
    q.add_argument("--gpu-type", default="rtx4090",
                   help="with --plan: the device whose published timm benchmark to use")

    q = cmd(sub, "query", "tinysaver.cli_select:cmd_query", "best saver and threshold for one base model")
    _add_selector_args(q)
    q.add_argument("--base", required=True)
    q.add_argument("--saver", action="append", help="restrict candidates to these savers (repeat for several)")
    q.add_argument("--top", type=positive_int, default=5, help="how many candidates to list")
    q.add_argument("--save", help="write the selection as JSON, for 'tinysaver infer --selection FILE'")

    q = cmd(sub, "select", "tinysaver.cli_select:cmd_select", "whole-zoo table: best saver of every base")
    _add_selector_args(q)
    q.add_argument("--out", help="path stem for the .csv and .md tables")

    q = cmd(sub, "plot", "tinysaver.cli_select:cmd_plot",
            "accuracy vs early-exit ratio and the cost/accuracy Pareto front (PNG)")
    _add_selector_args(q)
    q.add_argument("--base", required=True)
    q.add_argument("--saver", required=True)
    q.add_argument("--out", default="tinysaver-plot.png")

    q = cmd(sub, "infer", "tinysaver.cli_infer:cmd_infer", "classify images through saver → base")
    q.add_argument("paths", nargs="+", help="image files, folders or .tar files")
    _add_cascade_args(q)
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("--no-refill", action="store_true",
                   help="send each batch's survivors on at once instead of gathering full batches for the base")
    q.add_argument("--pipeline", action="store_true",
                   help="run each later stage in its own thread, so the saver works on the next batch while the "
                        "base works on survivors (more images/s; give each stage fewer --threads)")
    q.add_argument("--backend-fallback", choices=["eager"],
                   help="run a stage whose export fails on eager instead of stopping")
    q.add_argument("--threads", type=int_list,
                   help="intra-op threads of onnxruntime/openvino stages: one for all, or one per stage, e.g. 1,2 "
                        "(default: torch's thread count)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    q.add_argument("--quiet", action="store_true")

    q = cmd(sub, "serve", "tinysaver.cli_serve:cmd_serve",
            "serve the cascade over HTTP on Ray Serve (POST /predict, /predict/batch; GET /healthz, /metrics)")
    _add_cascade_args(q)
    d = _serve_defaults()
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=positive_int, default=8000)
    q.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance)")
    q.add_argument("--max-batch-size", type=positive_int, default=d.max_batch_size, help="per stage, @serve.batch")
    q.add_argument("--batch-wait-ms", type=float, default=1e3 * d.batch_wait_timeout_s,
                   help="how long a stage waits to fill a batch")
    q.add_argument("--replicas", type=int_list, default=[d.replicas], help="one for all stages, or one per stage")
    q.add_argument("--num-cpus", default=d.num_cpus,
                   help="CPUs per stage replica: one, or one per stage (default: 1.5 shared by the stages, "
                        "at most 0.5 each)")
    q.add_argument("--num-gpus", default=str(d.num_gpus), help="GPUs per stage replica: one, or one per stage")
    q.add_argument("--audit", type=float, default=d.audit,
                   help="fraction of early answers also sent to the base, after answering, to bound the loss live")
    q.add_argument("--audit-tolerance", type=float, default=d.audit_tolerance,
                   help="accuracy points: a live loss bound above it raises the drift alarm")
    q.add_argument("--audit-window", type=positive_int, default=d.audit_window,
                   help="requests the live bound is computed over")
    q.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    q.add_argument("--esn", metavar="CHECKPOINT",
                   help="serve the saver and base of this 'tinysaver esn train' checkpoint with its exits inside the "
                        "base (one deployment per base stage); thresholds from --esn-thresholds, else chosen on the "
                        "zoo's calib split with --criterion/--tolerance")
    q.add_argument("--esn-thresholds", type=float_list,
                   help="with --esn: the saver's threshold and one per exit, comma-separated (inf disables an exit)")

    esn = sub.add_parser("esn", help="train and evaluate an Exit Sequence Network on a saver–base pair")
    esub = esn.add_subparsers(dest="esn_command", required=True)
    q = cmd(esub, "train", "esn.cli:cmd_train", "train an ESN on a saver–base pair")
    q.add_argument("--zoo", default="fashion-mnist")
    q.add_argument("--base", required=True)
    q.add_argument("--saver", required=True)
    q.add_argument("--config", help="YAML of ESN settings (see esn/configs/default.yaml)")
    q.add_argument("--epochs", type=positive_int)
    q.add_argument("--num-layers", type=int)
    q.add_argument("--dim", type=positive_int)
    q.add_argument("--out", required=True)
    q = cmd(esub, "eval", "esn.cli:cmd_eval", "choose exit thresholds on calib, report test and budgets")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--zoo", help="default: the zoo the checkpoint was trained in")
    q.add_argument("--base", help="refuse the checkpoint unless it was trained for this base")
    q.add_argument("--saver", help="refuse the checkpoint unless it was trained for this saver")
    q.add_argument("--criterion", choices=CRITERIA, default="zero")
    q.add_argument("--tolerance", type=float, default=0.0)
    q = cmd(esub, "grid", "esn.cli:cmd_grid", "train and evaluate ESNs over bus depths and widths")
    q.add_argument("--zoo", default="fashion-mnist")
    q.add_argument("--base", required=True)
    q.add_argument("--saver", required=True)
    q.add_argument("--criterion", choices=CRITERIA, default="zero")
    q.add_argument("--tolerance", type=float, default=0.0)
    q.add_argument("--config")
    q.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--dims", type=positive_int, nargs="+", default=[8, 32, 128])
    q.add_argument("--epochs", type=positive_int)

    ex = sub.add_parser("exits", help="compare the ESN with the related early-exit methods on one pair")
    xsub = ex.add_subparsers(dest="exits_command", required=True)
    q = cmd(xsub, "compare", "esn.cli:cmd_compare",
            "train ESN, SDN, ZTW, gates and label-free exits on one pair; one table and one plot")
    q.add_argument("--zoo", default="fashion-mnist")
    q.add_argument("--base", required=True)
    q.add_argument("--saver", required=True)
    q.add_argument("--methods", default="esn,sdn,ztw,gates,label-free",
                   help="comma-separated: esn, sdn, ztw (with its two ablations), gates, label-free")
    q.add_argument("--epochs", type=positive_int, default=10)
    q.add_argument("--label-free", action="store_true", help="train every method on the base's outputs only")
    q.add_argument("--calibrate", choices=["temperature"], help="fit a temperature per exit on calib first")
    q.add_argument("--alpha", type=float, default=0.1, help="conformal sets at coverage 1 − α")
    q.add_argument("--gate-lambda", type=float, default=1.0, help="λ, the weight of FLOPs in the gates' cost")
    q.add_argument("--lf-tolerance", type=float, default=1.0, help="T of the label-free T/2^n threshold rule (points)")
    q.add_argument("--wallclock-images", type=int, default=256, help="test images timed at batch 1 and 128 (0: skip)")
    q.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    q.add_argument("--png", help="write accuracy against FLOPs here")
    q.add_argument("--json", help="write the rows here")
    q = cmd(xsub, "regimes", "esn.cli:cmd_regimes",
            "SDN exits trained disjoint, joint and mixed (seed 002): what each costs the base head")
    q.add_argument("--zoo", default="fashion-mnist")
    q.add_argument("--base", required=True)
    q.add_argument("--regimes", default="disjoint,joint,mixed")
    q.add_argument("--joint-samples", type=positive_int, default=120_000,
                   help="training samples of the joint regime (the zoo's own base budget by default)")
    q.add_argument("--mixed-samples", type=positive_int, default=50_000)
    q.add_argument("--train-limit", type=positive_int, help="use only the first N images of each split")
    _fill_help(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _flatten(args, "batch_sizes")
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left early is caught here, not at exit
        return rc
    except BrokenPipeError:  # `tinysaver ... | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tinysaver: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
