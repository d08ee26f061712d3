"""Gears against the fixed policy under open-loop overload, on the same replica budget.

    python benchmarks/bench_gears.py --quick
    python benchmarks/bench_gears.py --seconds 60 --png docs/results/img/gears_step.png

One local Ray serves the cascade twice (default: Fashion's), fused, one replica each: ``fixed`` (the zero-loss
policy, what a service runs without gears) and ``gears`` (the gear plan within ``--max-loss``
points at δ = 0.1, holding ``--target-ms``). First the fixed app's capacity is measured (a closed
loop at concurrency 32). Then, for each load of 0.5×, 1×, 1.5× and 2× that capacity, each app gets
``--seconds`` of open-loop Poisson arrivals (a request is sent when its time comes, whether or not
earlier ones were answered), the two apps interleaved and their order flipped at every load.
Requests still unanswered ``--grace-s`` after the window closes count as missed; before each
run the app is given time to answer its backlog (a request within the target again).

Each run reports p50 and p99 latency of the answered requests, goodput (answers within the target,
per second of the window), 503s and other failures, the gear mix, and the accuracy loss against the
base on the labelled held-out images it answered (`tinysaver.splits.held_out`: never the images the
gears were certified on): the base's accuracy on those images minus the answers' (points; the bound
is the plan's ε). Where the models dominate an image's cost:

    python benchmarks/bench_gears.py --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k \
        --max-loss 5 --target-ms 2000 --quick With ``--png``, a load step (0.5× then 2× then 0.5×)
on the gears app, drawn: p99 per second and the gear of the answers against time.

The client runs on the same 2 cores (httpx, one task per request); its CPU share is printed. The
last line is the headline:
``at 2.0x capacity: p99 fixed A ms, gears B ms; goodput fixed C, gears D img/s; loss E pts (bound F)``.
"""
from __future__ import annotations

import asyncio
import os
import random
import resource
import time

import numpy as np

from common import parser, table_head
from loadgen import drive, encoded_images, start_local_ray

LOADS = (0.5, 1.0, 1.5, 2.0)


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, grace_s: float,
                    seed: int) -> list[dict]:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; one record per request sent:
    its send time (s from the start), latency (ms, None if unanswered), status, gear and class."""
    import httpx

    rng = random.Random(seed)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=seconds + grace_s + 30, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(k: int, at: float) -> None:
            rec = {"at": at, "ms": None, "status": None, "gear": None, "class": None, "image": k % len(bodies)}
            records.append(rec)
            try:
                r = await client.post(url, content=bodies[rec["image"]], headers={"content-type": "image/png"})
            except httpx.HTTPError as e:
                rec["status"] = type(e).__name__
                return
            rec["ms"], rec["status"] = 1e3 * (time.perf_counter() - t0 - at), r.status_code
            if r.status_code == 200:
                a = r.json()
                rec["gear"], rec["class"] = a.get("gear"), a["class"]

        tasks, at, k = [], 0.0, 0
        while True:
            at += rng.expovariate(rate)
            if at > seconds:
                break
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            tasks.append(asyncio.ensure_future(one(k, at)))
            k += 1
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, seconds + grace_s - (time.perf_counter() - t0)))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records


def settle(url: str, body: bytes, target_ms: float, limit_s: float = 120.0) -> float:
    """Wait until the app answers one request within the target again: a run's cancelled requests
    are still served after it, and would be the next run's backlog. Returns the seconds waited."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        t = time.perf_counter()
        try:
            ok = httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=60).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok and 1e3 * (time.perf_counter() - t) < target_ms:
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def summary(records: list[dict], seconds: float, target_ms: float, labels: np.ndarray, base: np.ndarray) -> dict:
    ok = [r for r in records if r["status"] == 200]
    ms = sorted(r["ms"] for r in ok)
    pct = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")  # noqa: E731
    idx = np.array([r["image"] for r in ok], dtype=int)
    got = np.array([r["class"] for r in ok], dtype=int)
    loss = 100.0 * (np.mean(base[idx] == labels[idx]) - np.mean(got == labels[idx])) if len(ok) else float("nan")
    gears: dict = {}
    for r in ok:
        gears[r["gear"]] = gears.get(r["gear"], 0) + 1
    return {"sent": len(records), "answered": len(ok), "p50": pct(0.5), "p99": pct(0.99),
            "goodput": sum(1 for r in ok if r["ms"] <= target_ms) / seconds,
            "503": sum(1 for r in records if r["status"] == 503),
            "failed": sum(1 for r in records if r["status"] not in (200, 503)), "loss": loss,
            "gears": {g: round(n / len(ok), 3) for g, n in sorted(gears.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}}


def step_plot(path: str, url: str, bodies, capacity: float, seconds: float, grace_s: float, target_ms: float) -> None:
    """The gears app through a load step, 0.5× → 2× → 0.5× capacity, drawn against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, offset = [], 0.0
    settle(url, bodies[0], target_ms)
    for k, load in enumerate((0.5, 2.0, 0.5)):
        part = asyncio.run(open_loop(url, bodies, load * capacity, seconds, grace_s, seed=100 + k))
        recs += [{**r, "at": r["at"] + offset} for r in part]
        offset += seconds
    fig, (a1, a2) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    edges = np.arange(0, offset + 1, 1.0)
    p99 = []
    for lo, hi in zip(edges, edges[1:]):
        w = sorted(r["ms"] for r in recs if lo <= r["at"] < hi and r["status"] == 200)
        p99.append(w[min(len(w) - 1, int(0.99 * len(w)))] if w else np.nan)
    a1.plot(edges[:-1], p99, label="p99 latency (ms), per second")
    a1.axhline(target_ms, ls="--", c="grey", label=f"target {target_ms:g} ms")
    a1.set_yscale("log")
    a1.legend()
    ok = [r for r in recs if r["status"] == 200]
    a2.scatter([r["at"] for r in ok], [r["gear"] for r in ok], s=2)
    a2.set_ylabel("gear of the answer")
    a2.set_xlabel(f"seconds (0.5× capacity, then 2× from {seconds:g} s, then 0.5× from {2 * seconds:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> int:
    ap = parser("fashion-mnist", description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--max-loss", type=float, default=1.0, help="the gears' budget ε, accuracy points")
    ap.add_argument("--target-ms", type=float, default=200.0, help="the p99 latency the gears hold")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of arrivals per run")
    ap.add_argument("--grace-s", type=float, default=5.0, help="how long unanswered requests are waited for")
    ap.add_argument("--images", type=int, default=2000, help="labelled held-out images sent, cycled")
    ap.add_argument("--quick", action="store_true", help="10 s per run, 2 s of grace, 1000 images: under 4 minutes")
    ap.add_argument("--png", help="also draw a load step on the gears app")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.grace_s, args.images = 10.0, 2.0, 1000

    import ray
    from ray import serve

    from tinysaver.cascade import build_cascade
    from tinysaver.gears import gear_plan, with_gears
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.splits import held_out
    from tinysaver.serve import ServeOptions, build_app
    from tinysaver.zoo import load_zoo

    t_start = time.monotonic()
    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig()).best
    plan = gear_plan(zoo, args.base, args.max_loss, 0.1, saver=sel.models[0])
    geared = with_gears(sel, plan)
    split, idx = held_out(zoo)
    idx = idx[:args.images]
    bodies, data = encoded_images(zoo, split, int(idx.max()) + 1)
    bodies, images, labels = [bodies[i] for i in idx], [data.images[i] for i in idx], np.asarray(data.labels)[idx]
    base = build_cascade(sel, zoo).predict(images, all_stages=True).stage_pred[-1]
    port = start_local_ray()
    common = dict(num_cpus=0.5)
    serve.run(build_app(sel, zoo, ServeOptions(**common)), name="fixed", route_prefix="/fixed")
    serve.run(build_app(geared, zoo, ServeOptions(gears=True, latency_target_ms=args.target_ms, **common)),
              name="gears", route_prefix="/gears")
    urls = {"fixed": f"http://127.0.0.1:{port}/fixed/predict", "gears": f"http://127.0.0.1:{port}/gears/predict"}
    for url in urls.values():  # warm-up
        drive(url, bodies, 8, 64)
    secs, _ = drive(urls["fixed"], bodies, 32, 400)
    capacity = 400 / secs
    print(f"{' → '.join(sel.models)}; gears {[round(t, 4) for t in plan.thresholds]} within {args.max_loss:g} points; "
          f"the fixed app's capacity (closed loop, concurrency 32): {capacity:.1f} img/s; target {args.target_ms:g} ms; "
          f"{args.seconds:g} s per run; {len(bodies)} held-out images of {split}; load {os.getloadavg()[0]:.2f} before",
          flush=True)
    rows = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    for k, load in enumerate(LOADS):
        order = ["fixed", "gears"] if k % 2 == 0 else ["gears", "fixed"]
        for name in order:
            settle(urls[name], bodies[0], args.target_ms)
            recs = asyncio.run(open_loop(urls[name], bodies, load * capacity, args.seconds, args.grace_s, seed=k))
            rows.append({"load": load, "app": name, **summary(recs, args.seconds, args.target_ms, labels, base)})
            r = rows[-1]
            print(f"  {load:.1f}x {name:6s}: sent {r['sent']}, answered {r['answered']}, p50 {r['p50']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms, goodput {r['goodput']:.1f} img/s, 503 {r['503']}, failed {r['failed']}, "
                  f"loss {r['loss']:.2f} pts, gears {r['gears']}; load {os.getloadavg()[0]:.2f}", flush=True)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (time.monotonic() - wall0)
    print(f"\nthe client's own CPU: {client_cpu:.2f} cores on average over the runs (of 2)")
    if args.png:
        step_plot(args.png, urls["gears"], bodies, capacity, max(10.0, args.seconds / 2), args.grace_s, args.target_ms)
    serve.shutdown()
    ray.shutdown()
    table_head("\n| load | app | sent | answered | p50 ms | p99 ms | goodput img/s | 503 | failed | loss pts | gear mix |")
    for r in rows:
        print(f"| {r['load']:.1f}x | {r['app']} | {r['sent']} | {r['answered']} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['goodput']:.1f} | {r['503']} | {r['failed']} | {r['loss']:.2f} | {r['gears']} |")
    f2, g2 = (next(r for r in rows if r["load"] == 2.0 and r["app"] == a) for a in ("fixed", "gears"))
    print(f"\n(run took {time.monotonic() - t_start:.0f} s)")
    print(f"at 2.0x capacity: p99 fixed {f2['p99']:.0f} ms, gears {g2['p99']:.0f} ms; goodput fixed "
          f"{f2['goodput']:.1f}, gears {g2['goodput']:.1f} img/s; loss {g2['loss']:.2f} pts (bound {args.max_loss:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
