"""The service's layouts against the floor of serving on the same machine, in one interleaved run.

    python benchmarks/bench_serve_layouts.py --zoo fashion-mnist --base resnet10t --requests 300
    python benchmarks/bench_serve_layouts.py --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k \\
        --split val --requests 96 --concurrency 1 32

Applications, all on one local Ray instance and driven by the same closed-loop httpx client
(``closed_loop`` of loadgen.py, one coroutine per simulated user), their runs alternating so a
noisy neighbour slows them alike:

- ``floor-uvicorn``: a bare FastAPI app on uvicorn (its own process) that decodes the image the way
  the service does and returns a constant: what HTTP and decoding alone cost;
- ``floor-serve``: the same handler as a one-deployment Serve app: what Serve's proxy adds;
- ``floor-serve-plain``: the same without FastAPI (Serve's ``__call__`` on the Starlette request):
  what FastAPI's routing and response handling add;
- ``floor-serve-mor8``: ``floor-serve`` with ``max_ongoing_requests=8`` instead of 256 (the
  service's own): whether letting fewer requests into the replica at once, the rest waiting in the
  proxy, helps on 2 cores;
- ``per-stage``: the cascade with a deployment per stage (eager);
- ``fused``: the cascade in one deployment, the default layout, on its default backend (ONNX Runtime
  where the zoo vouches for the export, see `tinysaver.serve.builders.layout_backend`);
- ``fused-eager``: the same on eager (``--backend eager``), the default before;
- ``fused-2r``: the same with two replicas (``--replicas 2``): two processes, each with its own GIL;
- ``fused-onnx``: the same on ONNX Runtime (``--backend onnxruntime``);
- ``floor-serve-grpc`` and ``fused-grpc``: the bare Serve app and the fused app again, driven
  through Serve's gRPC proxy (``tinysaver.serve.grpc_api``) instead of HTTP.

For the fused apps it also breaks each request's time into its parts (the replica's own timings
from ``/metrics``, the client's latency and CPU time), so the gap to in-process is measured, not
guessed. The in-process reference (``Cascade.predict`` at the service's batch size, on 2 torch
threads and on 1, and its batch-1 time per image) runs in this process once per round, between the
served runs, while the service idles, and once more after the service is gone. ``/predict/batch``,
16 images per request, runs against the same and against its own floor (``floor-serve`` and
``floor-serve-2r``: read and decode the images as the service does, stream a constant line each),
with the CPU each process spent per image and the bound those give (``cpu_bound``).
"""
# No ``from __future__ import annotations``: FastAPI reads the floor route's signature at definition time.
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loadgen import batch_loop, drive, encoded_images, free_port, start_local_ray, wait_up

FLOOR_APP = '''
from fastapi import FastAPI, Request
from tinysaver.serve.http import decode, read_files
app = FastAPI()

@app.post("/predict")
async def predict(request: Request):
    [(_, data)] = await read_files(request, False, 10 * 2**20)
    img = decode(data, 40_000_000)
    return {"class": 0, "confidence": 1.0, "exit_stage": 0, "shape": list(img.shape)}
'''


from fastapi import FastAPI, Request  # noqa: E402
from ray import serve as _serve  # noqa: E402
from common import parser, serve_load_options, table_head

floor_api = FastAPI()


@_serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=256)
@_serve.ingress(floor_api)
class Floor:
    """The bare Serve floor: decode as the service does, answer a constant."""

    @floor_api.post("/predict")
    async def predict(self, request: Request):
        from tinysaver.serve.http import decode, read_files

        [(_, data)] = await read_files(request, False, 10 * 2**20)
        img = decode(data, 40_000_000)
        return {"class": 0, "confidence": 1.0, "exit_stage": 0, "shape": list(img.shape)}

    @floor_api.post("/predict/batch")
    async def predict_batch(self, request: Request):
        """The floor of ``/predict/batch``: read the multipart body and decode every image as the
        service does, then stream a constant line per image, all in one chunk (the service's best
        case, where every answer is ready at once)."""
        import json

        from fastapi.responses import StreamingResponse

        from tinysaver.serve.http import decode_all, read_files

        files = await read_files(request, True, 64 * 2**20)
        imgs = await asyncio.to_thread(decode_all, [d for _, d in files], 40_000_000)

        async def stream():
            yield "".join(json.dumps({"index": k, "file": files[k][0], "class": 0, "confidence": 1.0,
                                      "exit_stage": 0, "shape": list(img.shape)}) + "\n" for k, img in enumerate(imgs))

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def Predict(self, data: bytes):  # noqa: N802 - the same over Serve's gRPC proxy (tinysaver.serve.grpc_api)
        from tinysaver.serve.grpc_api import reply
        from tinysaver.serve.http import decode

        img = decode(bytes(data), 40_000_000)
        return reply({"class": 0, "confidence": 1.0, "exit_stage": 0, "shape": list(img.shape)})


def floor_serve_app():
    return Floor.bind()


@_serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=256)
class PlainFloor:
    """The same floor without FastAPI: Serve hands ``__call__`` the Starlette request itself."""

    async def __call__(self, request: Request):
        from starlette.responses import JSONResponse

        from tinysaver.serve.http import decode, read_files

        [(_, data)] = await read_files(request, False, 10 * 2**20)
        img = decode(data, 40_000_000)
        return JSONResponse({"class": 0, "confidence": 1.0, "exit_stage": 0, "shape": list(img.shape)})


def timing_totals(predict_url: str) -> dict[str, float]:
    """The replica's summed server-side milliseconds per part (``timing_ms`` of /metrics × requests).
    One replica per app here, so one /metrics call sees every request."""
    import httpx

    t = httpx.get(predict_url.replace("/predict", "/metrics.json"), timeout=30).json()["timing_ms"]
    n = t["requests"]
    return {"requests": n, **{k: (v or 0.0) * n for k, v in t.items() if k != "requests"}}


# Serve application names; a "-grpc" app is the same application driven through Serve's gRPC proxy
APPS = {"floor-serve": "floor", "floor-serve-plain": "floorplain", "floor-serve-mor8": "floormor8",
        "per-stage": "perstage", "fused": "fused", "fused-onnx": "fusedonnx",
        "fused-eager": "fusedeager",
        "fused-2r": "fused2r", "floor-serve-2r": "floor2r",
        "floor-serve-grpc": "floor", "fused-grpc": "fused"}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (command line, user + system CPU seconds)} of every process on the machine."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            t = p.cpu_times()
            out[p.pid] = (" ".join(p.info["cmdline"] or []), t.user + t.system)
        except psutil.Error:
            pass
    return out


CPU_PARTS = ("client", "proxy", "replicas", "uvicorn", "rest")


def cpu_total(parts: dict) -> float:
    """The CPU of every part of a ``cpu_parts`` result (other keys, such as a row's labels, ignored)."""
    return sum(parts[k] for k in CPU_PARTS)


def cpu_parts(before: dict, after: dict, app: str | None, client_pid: int) -> dict[str, float]:
    """CPU seconds between two ``cpu_seconds`` snapshots, by part: this client, Serve's proxy, the
    replicas of Serve application ``app``, the uvicorn floor, and everything else."""
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    for pid, (cmd, t) in after.items():
        used = t - before.get(pid, (cmd, 0.0))[1]
        if pid == client_pid:
            parts["client"] += used
        elif "ProxyActor" in cmd:
            parts["proxy"] += used
        elif app and f"ServeReplica:{app}:" in cmd:
            parts["replicas"] += used
        elif "floor_app:app" in cmd:
            parts["uvicorn"] += used
        else:
            parts["rest"] += used
    return parts


BATCHED = ("per-stage", "fused", "fused-eager", "fused-onnx", "fused-grpc")


def batch_sizes(predict_url: str) -> dict:
    """{stage or "fused": {batch size (str): batches}} from the app's /metrics."""
    import httpx

    return httpx.get(predict_url.replace("/predict", "/metrics.json"), timeout=30).json()["batch_sizes"]


def in_process(cascades: dict, imgs: list, batch_size: int) -> dict[str, float]:
    """The in-process reference, once: ``Cascade.predict`` of ``imgs`` at ``batch_size`` on each
    backend (img/s and CPU ms per image, all threads), eager on 1 torch thread as in a replica of
    under 2 CPUs (Ray sets OMP_NUM_THREADS), and eager and onnxruntime at batch 1 (ms per image)."""
    import torch

    ip, others0, wall0 = {}, cpu_seconds(), time.perf_counter()
    for backend, cas in cascades.items():
        t0, c0 = time.perf_counter(), time.process_time()
        cas.predict(imgs, batch_size=batch_size)
        ip[backend] = len(imgs) / (time.perf_counter() - t0)
        ip[backend + ":cpu_ms"] = (time.process_time() - c0) / len(imgs) * 1e3
        t0 = time.perf_counter()
        cas.predict(imgs[:64], batch_size=1)
        ip[backend + ":bs1_ms"] = (time.perf_counter() - t0) / 64 * 1e3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        cascades["eager"].predict(imgs, batch_size=batch_size)
        ip["eager:1t"] = len(imgs) / (time.perf_counter() - t0)
        ip["eager:1t:cpu_ms"] = (time.process_time() - c0) / len(imgs) * 1e3
    finally:
        torch.set_num_threads(threads)
    # what the rest of the machine (an idle service, between rounds) took meanwhile: CPU ms per s
    used = cpu_parts(others0, cpu_seconds(), None, os.getpid())
    ip["others_cpu_ms_per_s"] = (cpu_total(used) - used["client"]) / (time.perf_counter() - wall0) * 1e3
    return ip


def cpu_bound(floor_cpu_ms: float, ip: dict) -> str:
    """The most images/s any app behind the same proxy and client can serve, from CPU alone: the
    machine's cores give ``cores × 1,000`` ms of CPU per second, and each image costs at least what
    the floor app spent on it (client, proxy, replica, Ray; ``floor_cpu_ms``) plus the in-process
    cascade's own CPU per image on its cheaper thread count."""
    cores = os.cpu_count() or 2
    cascade = min(ip["eager:cpu_ms"], ip["eager:1t:cpu_ms"])
    bound = cores * 1e3 / (floor_cpu_ms + cascade)
    return (f"bound from CPU ({cores} cores): the floor's {floor_cpu_ms:.2f} + the cascade's {cascade:.2f} ms CPU "
            f"per image → at most {bound:.1f} img/s = {bound / ip['eager']:.2f} of the in-process cascade")


def plot_throughput(rows: list[dict], names: list[str], in_process: float, batch: int, path: str) -> None:
    """Images per second against concurrency, one line per app, and the in-process cascade as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    cs = [r["concurrency"] for r in rows]
    for n in names:
        ax.plot(cs, [r[n] for r in rows], marker="o", label=n)
    ax.axhline(in_process, color="grey", linestyle="--", label=f"in process, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images per second")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> int:
    ap = parser("fashion-mnist")
    serve_load_options(ap, requests=300)
    ap.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of the local Ray instance (a whole number)")
    ap.add_argument("--fused-cpus", type=float, default=0.3,
                    help="num_cpus of a fused replica; Ray gives it that many torch threads when ≥ 1")
    ap.add_argument("--png", help="also plot each app's img/s against concurrency, with the in-process cascade")
    ap.add_argument("--batch-concurrency", type=int, nargs="+", default=[4, 16],
                    help="concurrent /predict/batch requests (16 images each)")
    ap.add_argument("--apps", default="floor-uvicorn,floor-serve,floor-serve-2r,floor-serve-grpc,per-stage,fused,"
                                      "fused-2r,fused-grpc,fused-onnx")
    args = ap.parse_args()
    apps = [a for a in args.apps.split(",") if a]

    import ray
    from ray import serve

    from tinysaver.cascade import build_cascade
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve import ServeOptions, build_app, service_spec
    from tinysaver.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig()).best
    bodies, data = encoded_images(zoo, args.split, min(args.requests, 1000))

    # what each app runs on: the fused apps without --backend take the layout's default
    default = service_spec(sel, zoo, ServeOptions(layout="fused")).stages.backends[0]

    def backend_of(app: str) -> str:
        if app.endswith("onnx"):
            return "onnxruntime"
        return default if app in ("fused", "fused-2r", "fused-grpc") else "eager"

    port, uport, gport = free_port(), free_port(), free_port()
    floor = None
    if "floor-uvicorn" in apps:
        Path("/tmp/floor_app.py").write_text(FLOOR_APP)
        floor = subprocess.Popen([sys.executable, "-m", "uvicorn", "floor_app:app", "--port", str(uport),
                                  "--log-level", "warning", "--app-dir", str(Path("/tmp"))],
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    import torch

    # the in-process reference runs in this process between the served runs, so that both see the
    # machine of the same minutes (its speed drifts by up to 1.5× here)
    cascades = {b: build_cascade(sel, zoo, backend=b) for b in ("eager", "onnxruntime")}
    ip_runs = []
    in_process(cascades, data.images[:64], args.max_batch_size)  # warm-up
    start_local_ray(args.ray_cpus, port, grpc_port=gport)
    common = dict(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3)
    urls, batch_only = {}, {}  # batch_only: apps run on /predict/batch alone
    if "floor-serve-2r" in apps:  # the floor of a two-replica app's /predict/batch
        serve.run(Floor.options(num_replicas=2).bind(), name="floor2r", route_prefix="/floor2r")
        batch_only["floor-serve-2r"] = f"http://127.0.0.1:{port}/floor2r/predict"
    if "floor-serve" in apps:
        serve.run(floor_serve_app(), name="floor", route_prefix="/floor")
        urls["floor-serve"] = f"http://127.0.0.1:{port}/floor/predict"
    if "floor-serve-plain" in apps:
        serve.run(PlainFloor.bind(), name="floorplain", route_prefix="/floorplain")
        urls["floor-serve-plain"] = f"http://127.0.0.1:{port}/floorplain/predict"
    if "floor-serve-mor8" in apps:
        serve.run(Floor.options(max_ongoing_requests=8).bind(), name="floormor8", route_prefix="/floormor8")
        urls["floor-serve-mor8"] = f"http://127.0.0.1:{port}/floormor8/predict"
    if "per-stage" in apps:
        o = ServeOptions(layout="per-stage", num_cpus=0.25, ingress_num_cpus=0.2, **common)
        serve.run(build_app(sel, zoo, o), name="perstage", route_prefix="/perstage")
        urls["per-stage"] = f"http://127.0.0.1:{port}/perstage/predict"
    if "fused" in apps:
        serve.run(build_app(sel, zoo, ServeOptions(layout="fused", num_cpus=args.fused_cpus, **common)), name="fused",
                  route_prefix="/fused")
        urls["fused"] = f"http://127.0.0.1:{port}/fused/predict"
    if "fused-2r" in apps:  # two replicas: two processes, each with its own GIL and torch thread
        # 0.2 each, so that every app fits 2 logical CPUs (a replica under 1 CPU runs torch on 1 thread)
        cpus = 0.2 if args.fused_cpus < 1 else args.fused_cpus
        o = ServeOptions(layout="fused", num_cpus=cpus, replicas=2, **common)
        serve.run(build_app(sel, zoo, o), name="fused2r", route_prefix="/fused2r")
        urls["fused-2r"] = f"http://127.0.0.1:{port}/fused2r/predict"
    if "fused-eager" in apps:
        o = ServeOptions(layout="fused", num_cpus=args.fused_cpus, backend="eager", **common)
        serve.run(build_app(sel, zoo, o), name="fusedeager", route_prefix="/fusedeager")
        urls["fused-eager"] = f"http://127.0.0.1:{port}/fusedeager/predict"
    if "fused-onnx" in apps:
        o = ServeOptions(layout="fused", num_cpus=args.fused_cpus, backend="onnxruntime", **common)
        serve.run(build_app(sel, zoo, o), name="fusedonnx", route_prefix="/fusedonnx")
        urls["fused-onnx"] = f"http://127.0.0.1:{port}/fusedonnx/predict"
    for name in [a for a in apps if a.endswith("-grpc")]:  # after their HTTP twins (dicts keep order)
        if name[:-len("-grpc")] in urls:
            urls[name] = f"grpc://127.0.0.1:{gport}/{APPS[name]}"
    if floor is not None:
        wait_up(f"http://127.0.0.1:{uport}/docs")
        urls = {"floor-uvicorn": f"http://127.0.0.1:{uport}/predict", **urls}
    print(f"{args.zoo}: {' → '.join(sel.models)} (threshold {sel.thresholds[0]:.4f}); the fused layout's default "
          f"backend: {default}; {args.requests} requests per "
          f"run, max batch {args.max_batch_size}, wait {args.batch_wait_ms} ms, {args.repeats} alternating runs; "
          f"medians; load before: {os.getloadavg()[0]:.2f}", flush=True)
    for url in urls.values():  # warm-up
        drive(url, bodies, 4, 32)
    rows, gaps, cpu_rows, batches = [], [], [], {}
    for c in args.concurrency:
        runs = {name: [] for name in urls}
        cpu = {name: [] for name in urls}
        # one /metrics call sees one replica: the breakdown is of the one-replica apps
        parts = {name: [] for name in urls if name in ("fused", "fused-eager", "fused-onnx")}
        for _ in range(args.repeats):
            for name, url in urls.items():
                before = timing_totals(url) if name in parts else None
                http = urls[name.removesuffix("-grpc")]  # a gRPC run's app answers /metrics over HTTP
                sizes0 = batch_sizes(http) if name in BATCHED else None
                procs0, cpu0 = cpu_seconds(), time.process_time()
                runs[name].append(drive(url, bodies, c, args.requests))
                client_cpu = (time.process_time() - cpu0) / args.requests * 1e3
                used = cpu_parts(procs0, cpu_seconds(), APPS.get(name), os.getpid())
                cpu[name].append({k: v / args.requests * 1e3 for k, v in used.items()})
                if sizes0 is not None:
                    for stage, hist in batch_sizes(http).items():
                        got = batches.setdefault((c, name, stage), {})
                        for k, v in (hist or {}).items():
                            got[k] = got.get(k, 0) + v - (sizes0.get(stage) or {}).get(k, 0)
                if before is not None:
                    after = timing_totals(url)
                    n = after["requests"] - before["requests"]
                    part = {k: (after[k] - before[k]) / n for k in after if k != "requests"}
                    part["client"] = float(np.mean([r["client_ms"] for r in runs[name][-1][1]]))
                    part["client_cpu"] = client_cpu
                    parts[name].append(part)
            ip_runs.append(in_process(cascades, data.images, args.max_batch_size))
        for name, ps in parts.items():
            gaps.append({"concurrency": c, "app": name, **{k: float(np.median([p[k] for p in ps])) for k in ps[0]}})
        row = {"concurrency": c}
        for name, rs in runs.items():
            lat = np.concatenate([[r["client_ms"] for r in res] for _, res in rs])
            row[name] = float(np.median([args.requests / t for t, _ in rs]))
            row[name + ":p50"] = float(np.percentile(lat, 50))
            if name.startswith(("fused", "per-stage")):
                res = [r for _, results in rs for r in results]
                st = np.array([r["exit_stage"] for r in res])
                ms = np.array([r["client_ms"] for r in res])
                row[name + ":early_p50"] = float(np.median(ms[st == 0])) if (st == 0).any() else float("nan")
        for name, cs in cpu.items():
            cpu_rows.append({"concurrency": c, "app": name, **{k: float(np.median([x[k] for x in cs])) for k in cs[0]}})
        rows.append(row)
        print(f"  concurrency {c}: " + ", ".join(f"{n} {row[n]:.1f}" for n in urls) + " img/s", flush=True)
    batch_runs: dict[tuple[str, int], list[float]] = {}
    batch_cpu: dict[tuple[str, int], list[dict]] = {}
    n_batch = args.requests * 2 // 16 * 16  # images per /predict/batch run
    batch_urls = {**{n: u for n, u in urls.items() if n in ("floor-serve", "fused", "fused-eager", "fused-2r",
                                                              "fused-onnx")},
                  **batch_only}
    for _ in range(args.repeats):
        for c in args.batch_concurrency:
            for name, url in batch_urls.items():
                procs0 = cpu_seconds()
                rate = asyncio.run(batch_loop(url.replace("/predict", "/predict/batch"), bodies, 16, c, n_batch))
                used = cpu_parts(procs0, cpu_seconds(), APPS.get(name), os.getpid())
                batch_runs.setdefault((name, c), []).append(rate)
                batch_cpu.setdefault((name, c), []).append({k: v / n_batch * 1e3 for k, v in used.items()})
        ip_runs.append(in_process(cascades, data.images, args.max_batch_size))
    batch_rate = {k: float(np.median(v)) for k, v in batch_runs.items()}
    print(f"load after the served runs: {os.getloadavg()[0]:.2f}", flush=True)
    serve.shutdown()
    ray.shutdown()
    if floor is not None:
        floor.terminate()
        floor.wait(timeout=30)
    after = in_process(cascades, data.images, args.max_batch_size)
    ip = {k: float(np.median([r[k] for r in ip_runs])) for k in ip_runs[0]}
    threads = torch.get_num_threads()
    print(f"\nin-process, after the service was gone (for reference; the ratios below use the runs interleaved "
          f"with the served ones): eager {after['eager']:.1f} img/s, on 1 thread {after['eager:1t']:.1f}, "
          f"onnxruntime {after['onnxruntime']:.1f}; other processes took {after['others_cpu_ms_per_s']:.0f} ms CPU "
          f"per s meanwhile, against {ip['others_cpu_ms_per_s']:.0f} during the interleaved runs")
    print(f"in-process (torch threads {threads}) at batch {args.max_batch_size}, medians of the {len(ip_runs)} runs "
          f"interleaved with the served ones (the service idle meanwhile): eager "
          f"{ip['eager']:.1f} img/s, onnxruntime {ip['onnxruntime']:.1f} img/s; batch 1: eager "
          f"{ip['eager:bs1_ms']:.2f} ms/img, onnxruntime {ip['onnxruntime:bs1_ms']:.2f} ms/img\n")
    names = list(urls)
    ratios = [("fused", "per-stage"), ("fused", "floor-serve"), ("fused-eager", "floor-serve"), ("fused-2r", "per-stage"),
              ("fused-2r", "floor-serve"),
              ("fused-grpc", "floor-serve-grpc"), ("fused-grpc", "floor-serve"),
              ("floor-serve-plain", "floor-serve"), ("floor-serve-mor8", "floor-serve")]
    ratios = [(a, b) for a, b in ratios if a in urls and b in urls]  # the pairs this run has
    table_head("| concurrency | " + " | ".join(f"{n} img/s" for n in names) + " | " +
          " | ".join(f"{a} / {b}" for a, b in ratios) + " | fused / in-process |")
    for r in rows:
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}" if a in r and b in r else "–"  # noqa: E731
        fip = f"{r['fused'] / ip[backend_of('fused')]:.2f}" if "fused" in r else "–"
        print(f"| {r['concurrency']} | " + " | ".join(f"{r[n]:.1f}" for n in names) + " | " +
              " | ".join(ratio(a, b) for a, b in ratios) + f" | {fip} |")
    for r in rows:
        for n in [n for n in ("fused", "fused-2r", "fused-grpc") if n in r]:
            b = backend_of(n)
            print(f"concurrency {r['concurrency']}: {n} {r[n]:.1f} img/s = {r[n] / ip[b]:.2f} of the in-process "
                  f"{b} cascade at batch {args.max_batch_size} on {threads} threads"
                  + (f", {r[n] / ip['eager:1t']:.2f} of it on 1 thread ({ip['eager:1t']:.1f} img/s)" if b == "eager"
                     else ""))
    if args.png:
        plot_throughput(rows, names, ip["eager"], args.max_batch_size, args.png)
    early = [n for n in ("fused", "fused-2r", "fused-grpc") if n in names]
    table_head("\n| concurrency | " + " | ".join(f"{n} p50 ms" for n in names) + " | " +
          " | ".join(f"{n} early-answer p50 ms" for n in early) + " |")
    for r in rows:
        print(f"| {r['concurrency']} | " + " | ".join(f"{r[n + ':p50']:.1f}" for n in names) + " | " +
              " | ".join(f"{r.get(n + ':early_p50', float('nan')):.1f}" for n in early) + " |")
    if gaps:
        print("\nWhere a /predict request's time goes (mean ms per request, medians of the runs). The server's parts "
              "come from the replica's /metrics; 'proxy + transport' is the client's mean latency less the server's "
              "read + decode + answer: Serve's proxy, the HTTP hops and the request's serialisation to the replica. "
              "'client CPU' is the benchmark client's own CPU time per request, on the same cores.")
        table_head("| concurrency | app | client latency | proxy + transport | read body | decode | batch wait | engine |"
              " engine CPU | client CPU |")
        for g in gaps:
            server = g["read"] + g["decode"] + g["answer"]
            print(f"| {g['concurrency']} | {g['app']} | {g['client']:.1f} | {g['client'] - server:.1f} | {g['read']:.2f} "
                  f"| {g['decode']:.2f} | {g['queue']:.1f} | {g['engine']:.1f} | {g.get('engine_cpu', 0.0):.2f} "
                  f"| {g['client_cpu']:.2f} |")
    if cpu_rows:
        print("\nCPU time per /predict request, by process (ms, medians of the runs; the whole machine has 2 cores, so "
              "2,000 ms of CPU per second at most). 'replicas': the app's own Serve replicas; 'rest': Ray's other "
              "processes (controller, raylet, GCS, idle apps) and anything else on the machine.")
        table_head("| concurrency | app | client | proxy | replicas | uvicorn | rest | total |")
        for r in cpu_rows:
            print(f"| {r['concurrency']} | {r['app']} | " + " | ".join(f"{r[k]:.2f}" for k in CPU_PARTS) +
                  f" | {cpu_total(r):.2f} |")
    for r in cpu_rows:
        if r["app"] == "floor-serve":
            print(f"concurrency {r['concurrency']}, /predict: " + cpu_bound(cpu_total(r), ip))
    if batches:
        print("\nBatches the replicas ran during the /predict runs (all runs of each concurrency):")
        table_head("| concurrency | app | stage | batches | mean size | of size 1 |")
        for (c, name, stage), hist in batches.items():
            n = sum(hist.values())
            if n:
                mean = sum(int(k) * v for k, v in hist.items()) / n
                print(f"| {c} | {name} | {stage} | {n} | {mean:.1f} | {hist.get('1', 0) / n:.0%} |")
    if batch_rate:
        print(f"\n/predict/batch, 16 images per request ({n_batch} images per run, medians of {args.repeats}); the "
              f"floor apps read and decode the images as the service does and stream a constant line each. In-process "
              f"eager cascade: {ip['eager']:.1f} img/s ({ip['eager:cpu_ms']:.2f} ms CPU per image), on 1 torch thread "
              f"{ip['eager:1t']:.1f} img/s ({ip['eager:1t:cpu_ms']:.2f} ms CPU per image); onnxruntime "
              f"{ip['onnxruntime']:.1f} img/s ({ip['onnxruntime:cpu_ms']:.2f} ms). CPU ms per image by process:")
        table_head("| concurrency | app | img/s | / in-process (same backend) | / in-process on 1 thread | client | proxy | "
              "replicas | rest | total CPU |")
        for (name, c), rate in batch_rate.items():
            ref = ip[backend_of(name)]
            one_t = "–" if backend_of(name) != "eager" else f"{rate / ip['eager:1t']:.2f}"
            u = {k: float(np.median([x[k] for x in batch_cpu[name, c]])) for k in batch_cpu[name, c][0]}
            keys = ("client", "proxy", "replicas", "rest")
            print(f"| {c} | {name} | {rate:.1f} | {rate / ref:.2f} | {one_t} | " +
                  " | ".join(f"{u[k]:.2f}" for k in keys) + f" | {cpu_total(u):.2f} |")
        for c in args.batch_concurrency:
            for name, floor_app in (("fused", "floor-serve"), ("fused-eager", "floor-serve"),
                                    ("fused-2r", "floor-serve-2r")):
                if (name, c) in batch_rate and (floor_app, c) in batch_rate:
                    print(f"concurrency {c}: {name} {batch_rate[name, c]:.1f} img/s = "
                          f"{batch_rate[name, c] / batch_rate[floor_app, c]:.2f} of {floor_app}; {floor_app} itself "
                          f"= {batch_rate[floor_app, c] / ip['eager']:.2f} of the in-process cascade")
            if ("floor-serve", c) in batch_cpu:
                floor_cpu = float(np.median([cpu_total(x) for x in batch_cpu["floor-serve", c]]))
                print(f"concurrency {c}, /predict/batch: " + cpu_bound(floor_cpu, ip))
    one = next((r for r in rows if r["concurrency"] == 1), None)
    for app, floor_app in (("fused", "floor-serve"), ("fused-2r", "floor-serve"), ("fused-grpc", "floor-serve-grpc")):
        if one and app in one and floor_app in one:
            budget = one[floor_app + ":p50"] + ip["eager:bs1_ms"] + 3
            print(f"\nconcurrency 1: {app} early-answer p50 {one[app + ':early_p50']:.1f} ms against {floor_app} p50 "
                  f"{one[floor_app + ':p50']:.1f} + in-process batch-1 {ip['eager:bs1_ms']:.1f} + 3 = {budget:.1f} ms: "
                  f"{'met' if one[app + ':early_p50'] <= budget else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
