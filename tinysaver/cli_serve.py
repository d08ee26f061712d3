"""Handler of ``tinysaver serve``: the selected cascade as an HTTP service on Ray Serve."""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time


def _floats(text: str | None, what: str) -> float | list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what} takes a number or one per stage, comma-separated, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise ValueError(f"{what} must be ≥ 0, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def serve_options(args: argparse.Namespace):
    from .serve import ServeOptions

    backends = args.backend.split(",")
    return ServeOptions(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                        replicas=args.replicas[0] if len(args.replicas) == 1 else args.replicas,
                        num_cpus=_floats(args.num_cpus, "--num-cpus"), num_gpus=_floats(args.num_gpus, "--num-gpus"),
                        backend=backends[0] if len(backends) == 1 else backends, audit=args.audit,
                        delta=args.delta, audit_tolerance=args.audit_tolerance, audit_window=args.audit_window,
                        max_body_bytes=int(args.max_body_mb * 2**20),
                        accept_preprocess_change=args.accept_preprocess_change)


def _esn_app(args: argparse.Namespace, zoo, opts):
    """The saver + ESN exits + base application of ``--esn``, with the thresholds given or chosen on calib."""
    from esn.policy import ExitPolicy, calibrated_policy
    from esn.serve import build_esn_app, part_names
    from esn.train import Pair, load_esn

    if args.selection or args.threshold is not None or args.from_selection:
        raise ValueError("--esn serves the checkpoint's own saver and base: drop --selection, --threshold and "
                         "--from-selection (give the exits' thresholds with --esn-thresholds)")
    esn, ck = load_esn(args.esn, saver=args.saver[0] if args.saver else None, base=args.base)
    if args.saver and len(args.saver) > 1:
        raise ValueError("an ESN has one saver; give at most one --saver")
    if args.esn_thresholds:
        if args.calibrate:
            raise ValueError("--esn-thresholds apply to uncalibrated confidences; drop --calibrate, or drop "
                             "--esn-thresholds to choose thresholds and temperatures on calib")
        policy = ExitPolicy(list(args.esn_thresholds))
    else:
        pair = Pair.from_zoo(zoo, ck["saver"], ck["base"], ck["settings"]["granularity"])
        policy = calibrated_policy(zoo, pair, esn, args.criterion, args.tolerance, args.delta, args.calibrate)
    names = part_names(ck["saver"], ck["base"], esn.num_exits)
    print("tinysaver: exits and thresholds: " + ", ".join(f"{n} ≥ {t:.4f}" for n, t in zip(names, policy.thresholds))
          + f", then {names[-1]}", file=sys.stderr)
    return build_esn_app(args.esn, zoo, policy, opts), names


def cmd_serve(args: argparse.Namespace) -> int:
    from .report import describe
    from .selector import SelectorConfig, selection_for
    from .zoo import load_zoo

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise ValueError("tinysaver serve needs Ray Serve: pip install 'tinysaver[serve]'")
    opts = serve_options(args)  # bad options fail before Ray starts
    zoo = load_zoo(args.zoo, args.root)
    if args.esn:
        app, models = _esn_app(args, zoo, opts)
    else:
        if args.esn_thresholds:
            raise ValueError("--esn-thresholds needs --esn CHECKPOINT")
        sel = selection_for(zoo, args.base, SelectorConfig.from_options(args), savers=args.saver,
                            threshold=args.threshold, selection=args.selection, from_selection=args.from_selection)
        print(describe(sel), file=sys.stderr)
        from .serve import build_app

        app, models = build_app(sel, zoo, opts), sel.models  # validated before anything is deployed
    import ray
    from ray import serve
    stop = []

    def request_stop(signum, frame):  # Ctrl-C or SIGTERM (a container stopping), even when inherited ignored
        stop.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    from .serve import local_ray_env, start_serve

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        local_ray_env()  # settings for the local instance ray.init is about to start
    ray.init(address=address, log_to_driver=False)
    start_serve({"host": args.host, "port": args.port})
    serve.run(app, name="tinysaver", route_prefix="/")
    print(f"tinysaver: serving {' → '.join(models)} at http://{args.host}:{args.port} "
          "(POST /predict, POST /predict/batch, GET /healthz, GET /metrics); Ctrl-C stops", file=sys.stderr)
    while not stop:
        time.sleep(0.2)
    print("tinysaver: stopping; replicas answer what they accepted first", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()
    return 0
