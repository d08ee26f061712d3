"""``tinysaver serve``: the selected cascade as an HTTP service on Ray Serve.

``add_serve_args``, ``serve_options`` and ``run_app`` are what another package's serve command
(``tinysaver esn serve``) reuses, so every service starts and stops the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time

from ..errors import MissingExtraError, ServeError, UsageError
from ._args import add_cascade_args, command, int_list, non_negative_float, positive_float, positive_int


def register(sub) -> None:
    q = command(sub, "serve", cmd_serve,
                "serve the cascade over HTTP on Ray Serve (POST /predict, /predict/batch; GET /healthz, /metrics)")
    add_cascade_args(q)
    add_serve_args(q)
    q.add_argument("--esn", help=argparse.SUPPRESS)  # moved to 'tinysaver esn serve'; kept to say so


def add_serve_args(q: argparse.ArgumentParser) -> None:
    """The service's own options, with ``ServeOptions``'s defaults."""
    from ..serve import ServeOptions

    from ..serve import LAYOUTS

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
    q.add_argument("--grpc-port", type=_port, default=None,
                   help="also answer /tinysaver.Cascade/Predict over gRPC on this port (request: the image's "
                        "bytes; reply: the JSON of /predict); fewer CPU cycles per request than HTTP")
    q.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /predict* and /metrics (default: "
                        "$TINYSAVER_TOKEN, else none); /healthz stays open")
    q.add_argument("--high-throughput", action="store_true",
                   help="run the local Ray instance in Ray Serve's high-throughput mode (HAProxy in front of the "
                        "replicas, gRPC between deployments); a cluster joined with --address must have been "
                        "started in it")
    q.add_argument("--startup-timeout", type=positive_float, default=STARTUP_TIMEOUT_S,
                   help="seconds to wait for every replica to be scheduled and ready before giving up")
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
    q.add_argument("--max-body-mb", type=positive_float, default=d.max_body_bytes / 2**20)
    q.add_argument("--max-pixels", type=positive_int, default=d.max_pixels,
                   help="images with more pixels (width × height) get 413 before they are decoded")


STARTUP_TIMEOUT_S = 120.0


def _port(text: str) -> int:
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {v}")
    return v


def _resources(text: str):
    import json

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
    from ..serve import ServeOptions
    from ..serve.builders import HIGH_THROUGHPUT_ENV

    if args.high_throughput:
        if args.address or os.environ.get("RAY_ADDRESS"):
            raise UsageError("--high-throughput sets up the local Ray instance; a cluster you join is in it only if "
                             "its nodes were started with " +
                             " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items()))
        os.environ.update(HIGH_THROUGHPUT_ENV)

    backends = args.backend.split(",")
    return ServeOptions(layout=args.layout, max_pixels=args.max_pixels, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                        replicas=args.replicas[0] if len(args.replicas) == 1 else args.replicas,
                        num_cpus=_floats(args.num_cpus, "--num-cpus"), num_gpus=_floats(args.num_gpus, "--num-gpus"),
                        resources=args.resources,
                        backend=backends[0] if len(backends) == 1 else backends, audit=args.audit,
                        delta=args.delta, audit_tolerance=args.audit_tolerance, adapt=args.adapt,
                        max_body_bytes=max(1, int(args.max_body_mb * 2**20)),
                        accept_preprocess_change=args.accept_preprocess_change)


def need_serve() -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise MissingExtraError("tinysaver serve needs Ray Serve: pip install 'tinysaver[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..report import describe
    from ..selector import SelectorConfig, selection_for
    from ..zoo import load_zoo

    if args.esn:
        raise UsageError(f"ESN exits are served by 'tinysaver esn serve --checkpoint {args.esn}' now")
    need_serve()
    opts = serve_options(args)  # bad options fail before Ray starts
    zoo = load_zoo(args.zoo, args.root)
    sel = selection_for(zoo, args.base, SelectorConfig.from_options(args), savers=args.saver,
                        threshold=args.threshold, selection=args.selection, from_selection=args.from_selection)
    print(describe(sel), file=sys.stderr)

    from ..serve import plan_for, replica_needs
    from ..serve.builders import application

    plan = plan_for(sel, zoo, opts)  # validated before anything is deployed
    return run_app(application(plan, token_of(args)), sel.models, args, replica_needs(plan))


def token_of(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("TINYSAVER_TOKEN") or None


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Refuse a port that is taken before Ray starts (Ray's own failure comes 35 s later, as a trace)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}; "
                             f"choose another {option}") from None


def _wait_running(name: str, timeout_s: float, stop: list, needs: dict | None) -> None:
    """Until the application runs; a deployment that fails, or is still not running at the
    deadline, is a ServeError. At the deadline, a replica no node can hold (a missing GPU or
    custom resource) is named; otherwise the message is what Serve reports. Returns on Ctrl-C or
    SIGTERM."""
    import ray
    from ray import serve

    from ..serve import unschedulable

    deadline = time.monotonic() + timeout_s
    while not stop:
        app = serve.status().applications.get(name)
        state = str(getattr(app, "status", ""))
        if state.endswith("RUNNING"):
            return
        if needs and time.monotonic() > deadline:
            why = unschedulable(needs, ray.nodes())
            if why:
                raise ServeError(f"the service was not running after {timeout_s:.0f} s: {why}")
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            why = [f"{d}: {st.message}" for d, st in (app.deployments if app else {}).items()
                   if str(st.status) != "HEALTHY" and st.message] or [getattr(app, "message", "") or state]
            first = " ".join(why[0].split())[:400]
            verb = "failed to start" if state.endswith("DEPLOY_FAILED") else f"was not running after {timeout_s:.0f} s"
            raise ServeError(f"the service {verb}: {first}")
        time.sleep(0.5)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class AuditWatch:
    """Prints the audit's state changes on this terminal (they also go to the service's log),
    reading the open /healthz at most every 2 s."""

    def __init__(self, url: str, every_s: float = 2.0):
        self.url, self.every_s, self.next, self.state = url, every_s, 0.0, None
        self.switches = 0

    def poll(self) -> None:
        import json
        import urllib.request

        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every_s
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                audit = json.loads(r.read())["audit"]
        except Exception:  # noqa: BLE001 - a busy or restarting service: look again later
            return
        adapt = audit.get("adapt") or {}
        new = adapt.get("switch_count", 0) - self.switches
        for sw in adapt.get("switches", [])[-new:] if new > 0 else []:
            shown = ["∞ (the base alone)" if t is None else f"{t:g}" for t in (sw["from"], sw["to"])]
            print(f"tinysaver: adapt: threshold {shown[0]} → {shown[1]} after {sw['request']} requests "
                  f"({sw['why']})", file=sys.stderr, flush=True)
        self.switches += max(new, 0)
        state = audit.get("state")
        if state in (None, "off") or state == self.state:
            return
        if self.state is not None or state != "uncertain":
            b = audit.get("loss_points") or {}
            more = f"; about {audit['more_requests']:,} more requests would certify it" \
                if state == "uncertain" and audit.get("more_requests") else ""
            print(f"tinysaver: audit {state} after {audit['requests']} requests: loss against the base in "
                  f"[{b.get('lower', 0):.2f}, {b.get('upper', 100):.2f}] points, tolerance "
                  f"{audit['tolerance_points']:.2f}{more}", file=sys.stderr, flush=True)
        self.state = state


def run_app(app, models, args: argparse.Namespace, needs: dict | None = None) -> int:
    """Start Ray (or join ``--address``) and Serve, run ``app`` until Ctrl-C or SIGTERM, then stop.
    ``needs``: what each deployment's replica asks Ray for (to explain one that never starts)."""
    import ray
    from ray import serve

    from ..serve import grpc_api, local_ray_env, start_serve

    stop = []

    def request_stop(signum, frame):  # Ctrl-C or SIGTERM (a container stopping), even when inherited ignored
        stop.append(signum)

    def catch_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)

    check_port(args.host, args.port)
    grpc_port = args.grpc_port
    if grpc_port:
        if grpc_port == args.port:
            raise ServeError(f"--grpc-port {grpc_port} is also --port: give the gRPC proxy a port of its own")
        check_port(args.host, grpc_port, "--grpc-port")
    catch_signals()
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        local_ray_env()  # settings for the local instance ray.init is about to start
    try:
        ray.init(address=address, log_to_driver=False)
        catch_signals()  # ray.init installs a SIGTERM handler that dumps a C++ stack and aborts
        start_serve({"host": args.host, "port": args.port}, grpc_port=grpc_port)
        if hasattr(serve, "run_many"):  # deploy, then wait here, where a deadline and Ctrl-C apply
            serve.run_many([serve.RunTarget(app, name="tinysaver", route_prefix="/")],
                           wait_for_applications_running=False)
            _wait_running("tinysaver", args.startup_timeout, stop, needs)
        else:
            serve.run(app, name="tinysaver", route_prefix="/")
        if stop:  # Ctrl-C or SIGTERM during start-up: nothing was answered, nothing to drain
            print("tinysaver: stopped before the service was up", file=sys.stderr)
            return 0
        grpc_line = f", and gRPC {grpc_api.METHOD} at {args.host}:{grpc_port}" if grpc_port else ""
        print(f"tinysaver: serving {' → '.join(models)} at http://{args.host}:{args.port} "
              f"(POST /predict, POST /predict/batch, GET /healthz, GET /metrics){grpc_line}; Ctrl-C stops",
              file=sys.stderr)
        watch = AuditWatch(f"http://{_local(args.host)}:{args.port}/healthz")
        while not stop:
            time.sleep(0.2)
            watch.poll()
        print("tinysaver: stopping; replicas answer what they accepted first", file=sys.stderr)
        # Deleting the application drains its replicas. Serve's own shutdown would also kill its
        # controller mid-task, which Ray reports as "graceful_shutdown failed" on every clean stop;
        # a local instance goes with ray.shutdown instead, and a shared cluster keeps its Serve.
        serve.delete("tinysaver")
        address = None
    finally:
        if ray.is_initialized():
            if address:  # failed or stopped on a shared cluster: our application goes, quickly
                try:
                    serve.delete("tinysaver", _blocking=False)
                except Exception:  # noqa: BLE001 - the error being reported matters more
                    pass
            ray.shutdown()  # a local instance goes with it, replicas still starting included
    return 0
