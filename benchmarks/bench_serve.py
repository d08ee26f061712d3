"""The cascade served on Ray Serve under closed-loop load, against a served base and in-process cascades.

    python benchmarks/bench_serve.py --zoo fashion-mnist --base resnet10t --requests 400
    python benchmarks/bench_serve.py --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k --split val --requests 96
    python benchmarks/bench_serve.py --esn esn.pt   # adds the saver with ESN exits (tinysaver esn train)
    python benchmarks/bench_serve.py --layout per-stage --backend onnxruntime   # either layout, any runtime

Load generator: an asyncio client on httpx, one coroutine per simulated user, each sending its
next request as soon as its last one is answered (closed loop), at concurrency 1, 8 and 32. We
use it rather than locust because the closed-loop concurrency is then exact and in-process, and
every per-request field (exit stage, latency) comes back without parsing locust's reports.

Both applications (the cascade, and the base alone with the same batching settings) are deployed
side by side, and their runs alternate (base, cascade, base, cascade …) so that a noisy
neighbour slows both alike. For each concurrency: throughput, p50 and p99 latency (client side),
the exit ratio, and the p50 of early answers against the p50 of answers from the base. The
in-process reference runs ``Cascade.predict`` and the base alone on the same decoded images at the
stages' batch size; the goal is served speedup ≥ 0.9 × in-process speedup at concurrency 32.

With ``--esn``, a third application serves the checkpoint's saver with its ESN exits inside the base
(thresholds chosen on calib at zero loss, as ``tinysaver esn serve`` does), in the same alternation;
its in-process reference is the ESN's dynamic inference at the same batch size.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from loadgen import closed_loop, encoded_images, start_local_ray
from common import parser, serve_load_options, table_head


def in_process(sel, zoo, images, batch_size: int, repeats: int = 3, esn=None) -> dict[str, float]:
    """Images/s of the cascade, the base alone and (given ``esn`` = (pair, model, policy)) the ESN's
    dynamic inference, on decoded images at ``batch_size``, interleaved."""
    from tinysaver.cascade import Cascade

    stages = [zoo.load_model(m) for m in sel.models]
    runs = {"base": lambda x: Cascade(stages[-1:], []).predict(x, batch_size=batch_size)}
    cascade = Cascade(stages, sel.thresholds)
    runs["cascade"] = lambda x: cascade.predict(x, batch_size=batch_size)
    if esn is not None:
        from esn.exits import dynamic_predict

        pair, model, policy = esn
        runs["esn"] = lambda x: dynamic_predict(pair, model, policy, x, batch_size=batch_size)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():
        run(images[:batch_size])
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(images)
            times[name].append(time.perf_counter() - t0)
    return {k: len(images) / float(np.median(v)) for k, v in times.items()}


def main() -> int:
    ap = parser("fashion-mnist")
    serve_load_options(ap, requests=400)
    ap.add_argument("--layout", choices=["fused", "per-stage"], default="fused", help="the served apps' layout")
    ap.add_argument("--backend", default="eager", help="the served stages' runtime (eager, onnxruntime, openvino)")
    ap.add_argument("--esn", help="an ESN checkpoint for --base: also serve its saver with the ESN exits")
    args = ap.parse_args()

    import ray
    from ray import serve

    from tinysaver.policy import Selection
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve import ServeOptions, build_app
    from tinysaver.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig()).best
    if not sel.found:
        raise SystemExit(f"{args.base} has no saver in {args.zoo}")
    bodies, data = encoded_images(zoo, args.split, min(args.requests, 1000))
    esn = None
    if args.esn:
        from esn.policy import calibrated_policy
        from esn.serve import build_esn_app
        from esn.train import Pair, load_esn

        model, ck = load_esn(args.esn, base=args.base)
        pair = Pair.from_zoo(zoo, ck.saver, ck.base, ck.granularity)
        esn = (pair, model, calibrated_policy(zoo, pair, model))
    port = start_local_ray(2)
    # logical CPU shares only decide what Serve schedules: 3 apps with 9 stages must fit 2 CPUs
    cpus = (0.1, 0.1) if esn else (0.5, 0.25)
    opts = dict(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3, num_cpus=cpus[0],
                ingress_num_cpus=cpus[1], layout=args.layout, backend=args.backend)
    serve.run(build_app(sel, zoo, ServeOptions(**opts)), name="cascade", route_prefix="/cascade")
    serve.run(build_app(Selection.manual(zoo.name, [], args.base), zoo, ServeOptions(**opts)), name="base",
              route_prefix="/base")
    apps = ["base", "cascade"]
    if esn:
        serve.run(build_esn_app(args.esn, zoo, esn[2], ServeOptions(**opts)), name="esn", route_prefix="/esn")
        apps.append("esn")
        print(f"ESN thresholds (zero loss on calib): {', '.join(f'{t:.4f}' for t in esn[2].thresholds)}")
    url = f"http://127.0.0.1:{port}"
    print(f"{args.zoo}: {' → '.join(sel.models)} (threshold {sel.thresholds[0]:.4f}), {args.requests} requests per "
          f"run, max batch {args.max_batch_size}, wait {args.batch_wait_ms} ms, {args.repeats} alternating runs; "
          f"medians")
    for name in apps:  # warm-up
        asyncio.run(closed_loop(f"{url}/{name}/predict", bodies, 4, 32))
    rows = []
    for c in args.concurrency:
        runs = {name: [] for name in apps}
        for _ in range(args.repeats):
            for name in apps:
                runs[name].append(asyncio.run(closed_loop(f"{url}/{name}/predict", bodies, c, args.requests)))
        row = {"concurrency": c}
        for name, rs in runs.items():
            lat = np.concatenate([[r["client_ms"] for r in res] for _, res in rs])
            row[f"{name}_img_s"] = float(np.median([args.requests / t for t, _ in rs]))
            row[f"{name}_p50"], row[f"{name}_p99"] = np.percentile(lat, 50), np.percentile(lat, 99)
        res = [r for _, results in runs["cascade"] for r in results]
        stage = np.array([r["exit_stage"] for r in res])
        ms = np.array([r["client_ms"] for r in res])
        row["exit_ratio"] = float((stage == 0).mean())
        row["early_p50"] = float(np.median(ms[stage == 0])) if (stage == 0).any() else float("nan")
        row["late_p50"] = float(np.median(ms[stage > 0])) if (stage > 0).any() else float("nan")
        if esn:
            res = [r for _, results in runs["esn"] for r in results]
            stage = np.array([r["exit_stage"] for r in res])
            row["esn_share"] = np.bincount(stage, minlength=len(esn[2].thresholds) + 1) / len(stage)
        rows.append(row)
        print(f"  concurrency {c}: cascade {row['cascade_img_s']:.1f} img/s, base {row['base_img_s']:.1f} img/s",
              flush=True)
    serve.shutdown()
    ray.shutdown()
    ip = in_process(sel, zoo, data.images, args.max_batch_size, esn=esn)
    ip_c, ip_b = ip["cascade"], ip["base"]
    table_head("\n| concurrency | cascade img/s | p50 ms | p99 ms | exit ratio | p50 early exit | p50 via base | "
          "base img/s | base p50 | base p99 | served speedup |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['cascade_img_s']:.1f} | {r['cascade_p50']:.1f} | {r['cascade_p99']:.1f} | "
              f"{r['exit_ratio']:.1%} | {r['early_p50']:.1f} | {r['late_p50']:.1f} | {r['base_img_s']:.1f} | "
              f"{r['base_p50']:.1f} | {r['base_p99']:.1f} | {r['cascade_img_s'] / r['base_img_s']:.2f}× |")
    sp = ip_c / ip_b
    print(f"\nin-process at batch {args.max_batch_size}: cascade {ip_c:.1f} img/s, base {ip_b:.1f} img/s, "
          f"speedup {sp:.2f}×")
    top = max(rows, key=lambda r: r["concurrency"])
    served = top["cascade_img_s"] / top["base_img_s"]
    print(f"goal at concurrency {top['concurrency']}: served speedup {served:.2f}× ≥ 0.9 × in-process {sp:.2f}× = "
          f"{0.9 * sp:.2f}×: {'yes' if served >= 0.9 * sp else 'NO'}; the service costs "
          f"{ip_c / top['cascade_img_s']:.2f}× the in-process cascade's time per image")
    if esn:
        print("\nsaver + ESN exits, served (one deployment per part) against the same base:\n")
        table_head("| concurrency | ESN img/s | p50 ms | p99 ms | share answered per part (saver, exits, head) | "
              "served speedup vs base |")
        for r in rows:
            print(f"| {r['concurrency']} | {r['esn_img_s']:.1f} | {r['esn_p50']:.1f} | {r['esn_p99']:.1f} | "
                  f"{', '.join(f'{100 * x:.1f}%' for x in r['esn_share'])} | {r['esn_img_s'] / r['base_img_s']:.2f}× |")
        print(f"\nin-process at batch {args.max_batch_size}: saver + ESN {ip['esn']:.1f} img/s, speedup "
              f"{ip['esn'] / ip_b:.2f}× over the base")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
