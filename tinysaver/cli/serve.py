"""``tinysaver serve``: the selected cascade as an HTTP service on Ray Serve.

``add_serve_args``, ``serve_options`` and ``run_app`` are what another package's serve command
(``tinysaver esn serve``) reuses, so every service starts and stops the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from ..errors import MissingExtraError, UsageError
from ..gears import GearPlan, plan_gears
from ..report import describe
from ..selector import PolicyRequest, SelectorConfig, selection_for
from ..serve import LAYOUTS, ServeOptions, service_spec, replica_needs, routes
from ..backends import DEFAULT_BACKEND
from ..serve.builders import application
from ..serve.http import token_or_env
from ..serve.lifecycle import DRAIN_TIMEOUT_S, HIGH_THROUGHPUT_ENV, STARTUP_TIMEOUT_S, claim_ports, run_service
from ..zoo import load_zoo
from ._args import add_cascade_args, command, int_list, non_negative_float, positive_float, positive_int


def register(sub) -> None:
    q = command(sub, "serve", cmd_serve,
                f"serve the cascade over HTTP on Ray Serve ({routes.listing()})")
    add_cascade_args(q, backend_default=None,
                     backend_help=" (default: in the fused layout, ONNX Runtime where it is installed and the zoo "
                                  f"records an exact export of every stage; else {DEFAULT_BACKEND})")
    add_serve_args(q)
    q.add_argument("--esn", help=argparse.SUPPRESS)  # moved to 'tinysaver esn serve'; kept to say so


def add_serve_args(q: argparse.ArgumentParser) -> None:
    """The service's own options, with ``ServeOptions``'s defaults."""
    d = ServeOptions()
    q.add_argument("--layout", choices=LAYOUTS,
                   help="fused: every stage in each replica of one deployment (one hop; scale with --replicas); "
                        "per-stage: a deployment per stage, for stages that need their own hardware or replica "
                        "count (default: per-stage when --replicas/--num-cpus/--num-gpus are given per stage, "
                        "else fused)")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1 exposes the HTTP routes to the network "
                        "(see the README on what else a Ray cluster exposes)")
    q.add_argument("--port", type=_port, default=8000)
    q.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own start-up and shutdown messages")
    q.add_argument("--grpc-port", type=_port, default=None,
                   help="also answer /tinysaver.Cascade/Predict over gRPC on this port (request: the image's "
                        "bytes; reply: the JSON of /predict); fewer CPU cycles per request than HTTP")
    q.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on {', '.join(routes.with_token())} (default: "
                        "$TINYSAVER_TOKEN, else none); the health routes stay open")
    q.add_argument("--high-throughput", action="store_true",
                   help="run the local Ray instance in Ray Serve's high-throughput mode (HAProxy in front of the "
                        "replicas, gRPC between deployments); a cluster joined with --address must have been "
                        "started in it")
    q.add_argument("--startup-timeout", type=positive_float, default=STARTUP_TIMEOUT_S,
                   help="seconds to wait for every replica to be scheduled and ready before giving up")
    q.add_argument("--drain-timeout", type=positive_float, default=DRAIN_TIMEOUT_S,
                   help="on SIGTERM or Ctrl-C: seconds within which the command exits, refusing new requests "
                        "with 503 and answering those already admitted")
    q.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance)")
    q.add_argument("--max-batch-size", type=positive_int, default=d.max_batch_size, help="most images a model runs at once, per replica (under load a fused replica takes up to 4 such "
                                "batches per engine call, to run its base on full batches)")
    q.add_argument("--batch-wait-ms", type=non_negative_float, default=1e3 * d.batch_wait_timeout_s,
                   help="how long a stage waits to fill a batch")
    q.add_argument("--replicas", type=int_list, default=[d.replicas], help="one for all stages, or one per stage")
    q.add_argument("--num-cpus", default=d.num_cpus,
                   help="CPUs per stage replica: one, or one per stage (default: 1.5 shared by the stages, "
                        "at most 0.5 each)")
    q.add_argument("--num-gpus", default=str(d.num_gpus), help="GPUs per stage replica: one, or one per stage")
    q.add_argument("--resources", type=_resources, default=None,
                   help='custom Ray resources each replica needs, as JSON: {"node2": 1} for every stage, or '
                        '[{}, {"node2": 1}] one per stage (pins the base to the nodes that have node2)')
    q.add_argument("--audit", type=non_negative_float, default=d.audit,
                   help="fraction of early answers also sent to the base, after answering, to bound the loss live")
    q.add_argument("--audit-tolerance", type=positive_float, default=d.audit_tolerance,
                   help="accuracy points: certified while the live bound on the loss against the base is below it, "
                        "drift once the loss is shown to exceed it")
    q.add_argument("--adapt", action="store_true",
                   help="retune the saver's threshold within the bound: raise it on drift, lower it only once "
                        "fresh audits certify a lower one (needs --audit; a saver and its base)")
    q.add_argument("--gears", action="store_true",
                   help="switch between the selection's certified gears by load, holding --latency-target-ms "
                        "(fused layout, a saver and its base; the plan: tinysaver query --gears, or --max-loss)")
    q.add_argument("--latency-target-ms", type=positive_float, default=d.latency_target_ms,
                   help="with --gears: the p99 latency to hold by moving to cheaper gears")
    q.add_argument("--max-loss", type=positive_float, default=None,
                   help="with --gears and a selection without a gear plan: plan one within this many accuracy "
                        "points (at --delta)")
    q.add_argument("--max-body-mb", type=positive_float, default=d.max_body_bytes / 2**20)
    q.add_argument("--max-images", type=positive_int, default=d.max_images,
                   help="images per /predict/batch or OIP infer request (more get 413)")
    q.add_argument("--max-pixels", type=positive_int, default=d.max_pixels,
                   help="images with more pixels (width × height) get 413 before they are decoded")


def _port(text: str) -> int:
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {v}")
    return v


def _resources(text: str):
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f'expected JSON such as {{"node2": 1}}, got {text!r}') from None
    items = v if isinstance(v, list) else [v]
    ok = all(isinstance(d, dict) and all(isinstance(k, str) and isinstance(a, (int, float)) and not isinstance(a, bool)
                                         and 0 < a < float("inf") for k, a in d.items()) for d in items)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a {{name: amount > 0}} object or a list of them, got {text!r}")
    return v


def _floats(text: str | None, what: str) -> float | list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what} takes a number or one per stage, comma-separated, got {text!r}") from None
    if not vals or any(not 0 <= v < float("inf") for v in vals):
        raise UsageError(f"{what} must be finite and ≥ 0, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def serve_options(args: argparse.Namespace):
    """The ServeOptions the command line asks for. ``--high-throughput`` is applied here too, as
    both serve commands call this first, before anything imports Ray Serve (which reads the mode
    once, at import)."""
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # the local Ray's ``ray start`` turns on Ray's token authentication, as ray.init would; this
        # process presents the token only in the same mode, which Ray reads once, when imported
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if args.high_throughput:
        if args.address or os.environ.get("RAY_ADDRESS"):
            raise UsageError("--high-throughput sets up the local Ray instance; a cluster you join is in it only if "
                             "its nodes were started with " +
                             " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items()))
        os.environ.update(HIGH_THROUGHPUT_ENV)

    return ServeOptions(layout=args.layout, max_pixels=args.max_pixels, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                        replicas=args.replicas[0] if len(args.replicas) == 1 else args.replicas,
                        num_cpus=_floats(args.num_cpus, "--num-cpus"), num_gpus=_floats(args.num_gpus, "--num-gpus"),
                        resources=args.resources,
                        backend=args.backend, audit=args.audit,
                        delta=args.delta, audit_tolerance=args.audit_tolerance, adapt=args.adapt,
                        max_body_bytes=max(1, int(args.max_body_mb * 2**20)), max_images=args.max_images,
                        accept_preprocess_change=args.accept_preprocess_change,
                        gears=args.gears, latency_target_ms=args.latency_target_ms)


def need_serve() -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise MissingExtraError("tinysaver serve needs Ray Serve: pip install 'tinysaver[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.esn:
        raise UsageError(f"ESN exits are served by 'tinysaver esn serve --checkpoint {args.esn}' now")
    need_serve()
    opts = serve_options(args)  # bad options fail before Ray starts
    # the port answers liveness from here on, through the selection, the models' checks and Ray's start
    starting = claim_ports(args.host, args.port, args.grpc_port, hold=not _address(args))
    try:
        zoo = load_zoo(args.zoo, args.root)
        request = PolicyRequest.from_options(args)
        sel = with_planned_gears(selection_for(zoo, request), zoo, args)
        spec = service_spec(sel, zoo, opts)  # validated before anything is deployed
        app, needs = application(spec, token_or_env(args.token)), replica_needs(spec)
        print(describe(sel), file=sys.stderr)
        print(f"layout: {spec.layout}; backends: " + ", ".join(f"{n} on {b}" for n, b in zip(spec.stages.names,
                                                                                            spec.stages.backends)),
              file=sys.stderr)
        return run_app(app, sel.models, args, needs, starting)
    finally:
        if starting:
            starting.close()


def with_planned_gears(sel, zoo, args: argparse.Namespace):
    """``sel`` with a gear plan where ``--gears --max-loss`` asks for one it lacks (printed)."""
    if args.max_loss is not None and not args.gears:
        raise UsageError("--max-loss plans gears: give --gears too (and --latency-target-ms)")
    if args.gears and sel.gears is None and args.max_loss is not None and len(sel.stages) == 2:
        sel = plan_gears(sel, zoo, args.max_loss, SelectorConfig.from_options(args))
    if args.gears and sel.gears is not None:
        print(GearPlan.from_dict(sel.gears).table(), file=sys.stderr)
    return sel


def _address(args: argparse.Namespace) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS")


def run_app(app, models, args: argparse.Namespace, needs: dict | None = None, starting=None) -> int:
    """Run ``app`` as the command line asks (see `tinysaver.serve.lifecycle.run_service`)."""
    return run_service(app, models, host=args.host, port=args.port, grpc_port=args.grpc_port,
                       address=_address(args), startup_timeout_s=args.startup_timeout,
                       drain_timeout_s=args.drain_timeout, needs=needs, verbose=args.verbose, starting=starting)


__all__ = ["register", "add_serve_args", "serve_options", "need_serve", "cmd_serve", "run_app",
           "with_planned_gears"]
