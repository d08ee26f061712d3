"""Where a served replica's CPU goes: py-spy samples of the fused replica under load, summed by frame.

    python benchmarks/profile_replica.py --load predict --concurrency 32 --seconds 20
    python benchmarks/profile_replica.py --load batch --concurrency 4 --seconds 20
    python benchmarks/profile_replica.py --from-raw /tmp/replica.raw   # summarise a run's samples again

It starts ``tinysaver serve`` (fused layout) on a free port, warms it, then records the replica
(``ray::ServeReplica:…:Ingress``) with ``py-spy record --format raw`` (idle threads left out; with
``--native``, C/C++ frames too, idle threads included) while a closed-loop client posts Fashion PNGs to ``/predict`` (one image each) or ``/predict/batch`` (16 each). It
prints the answered images, the replica's CPU per image over the sampled window (from /proc), and
the frames that hold the most samples: by self time (the innermost frame) and by inclusive time
for named groups of our own code and of the libraries under it. py-spy needs ptrace rights over
the replica (root, or ``kernel.yama.ptrace_scope`` 0).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from common import parser
from loadgen import batch_loop, closed_loop, encoded_images, free_port
from tinysaver.zoo import load_zoo

# inclusive groups: a sample counts for a group when any of its frames matches the pattern
GROUPS = {
    "engine.run (all stages)": r"\brun \(tinysaver/engine\.py",
    "models (torch modules' forward)": r"_call_impl \(torch/nn/modules/module\.py",
    "prepare_batch (resize, crop, normalise)": r"prepare_batch \(tinysaver/transforms\.py",
    "decode (PNG/JPEG to pixels)": r"\bdecode(_all)? \(tinysaver/serve/http\.py",
    "read_files (multipart/body parsing)": r"read_files \(tinysaver/serve/http\.py",
    "_record (counts, audit draw, metrics)": r"_record \(tinysaver/serve/deployments\.py",
    "ray.util.metrics calls": r"\(ray/util/metrics\.py",
    "prometheus_client calls": r"prometheus_client/",
    "starlette/fastapi routing and middleware": r"\((starlette|fastapi)/",
    "json encoding of answers": r"(json/encoder\.py|render \(starlette/responses)",
    "Ray actor call plumbing": r"_actor_method_call|ray/serve/_private/replica\.py",
    "asyncio event loop": r"_run_once \(asyncio/base_events\.py",
}


def replica_pid(app: str = "tinysaver") -> int:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app}:Ingress" in cmd:
            return p.pid
    raise RuntimeError("no Ingress replica found")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name and CPU seconds so far (user + system, from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


# self time by package: a sample's innermost frame, by the file it is in (the first prefix found)
PACKAGES = ("tinysaver/", "timm/", "torchvision/", "torch/", "PIL/", "starlette/", "fastapi/", "anyio/", "ray/serve/",
            "ray/", "asyncio/", "concurrent/", "threading", "json/", "logging/", "prometheus_client/", "multipart")


def package(frame: str) -> str:
    """The package a py-spy frame ("function (path:line)") is in; tinysaver's by module."""
    m = re.search(r"\(([^:)]+)", frame)
    path = m.group(1) if m else frame
    for p in PACKAGES:
        if path.startswith(p) or f"/{p}" in path:
            return path if p == "tinysaver/" else p.rstrip("/")
    return "other"


def summarise(raw: str, top: int) -> tuple[int, list, list, list]:
    """py-spy's raw output ("frame;frame;… count" per line) → total samples, the top self frames,
    each group's inclusive count, and the self time by package."""
    self_time: Counter = Counter()
    groups: Counter = Counter()
    packages: Counter = Counter()
    total = 0
    pats = {name: re.compile(p) for name, p in GROUPS.items()}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_time[frames[-1]] += n
        packages[package(frames[-1])] += n
        for name, pat in pats.items():
            if pat.search(stack):
                groups[name] += n
    return total, self_time.most_common(top), sorted(groups.items(), key=lambda kv: -kv[1]), packages.most_common()


def main() -> int:
    ap = parser()
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--load", choices=["predict", "batch"], default="predict")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--serve-args", default="", help="more options for tinysaver serve, e.g. '--backend onnxruntime'")
    ap.add_argument("--out", default="/tmp/replica.raw", help="where py-spy's raw samples go")
    ap.add_argument("--from-raw", help="summarise this raw file of an earlier run instead of running one")
    ap.add_argument("--gil", action="store_true",
                    help="sample only the thread holding the GIL: the replica's Python work, without idle threads "
                         "(torch's kernels release the GIL, so the models' share drops)")
    ap.add_argument("--native", action="store_true",
                    help="also sample C/C++ frames; py-spy then pauses the replica for each sample and cannot "
                         "tell idle threads from busy ones, so every waiting thread's samples count too")
    args = ap.parse_args()
    if args.from_raw:
        show_samples(*summarise(Path(args.from_raw).read_text(), args.top), args.top)
        return 0

    port = free_port()
    log = open(Path(args.out).with_suffix(".serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", args.zoo, "--base", args.base,
                             "--port", str(port), *args.serve_args.split()],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"the service did not come up; see {log.name}")
            time.sleep(0.5)
        bodies, _ = encoded_images(load_zoo(args.zoo), "test", 200)
        pid = replica_pid()

        def load(images: int) -> int:
            if args.load == "predict":
                _, res = asyncio.run(closed_loop(url + "/predict", bodies, args.concurrency, images))
                return len(res)
            asyncio.run(batch_loop(url + "/predict/batch", bodies, 16, args.concurrency, images))
            return images

        load(400)  # warm: every batch size the load makes has run once
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                "--rate", str(args.rate), "--format", "raw",
                                *(["--native"] if args.native else ["--nonblocking"]), *(["--gil"] if args.gil else []),
                                "--output", args.out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cpu0, threads0, t0, n = psutil.Process(pid).cpu_times(), thread_cpu(pid), time.monotonic(), 0
        while time.monotonic() - t0 < args.seconds:
            n += load(400 if args.load == "predict" else 320)
        cpu1, threads1, wall = psutil.Process(pid).cpu_times(), thread_cpu(pid), time.monotonic() - t0
        spy_said = spy.communicate(timeout=120)[0]
        timing = httpx.get(url + "/metrics.json", timeout=30).json()["timing_ms"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    if not Path(args.out).is_file():
        print(f"py-spy recorded nothing: {spy_said.strip()[-500:]}")
        return 1
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    total, top, groups, packages = summarise(Path(args.out).read_text(), args.top)
    print(f"load: /{'predict' if args.load == 'predict' else 'predict/batch'} at concurrency {args.concurrency}, "
          f"{n} images in {wall:.1f} s ({n / wall:.1f} img/s); machine load {os.getloadavg()[0]:.1f}")
    print(f"replica CPU: {cpu:.2f} s = {cpu / n * 1e3:.2f} ms per image; py-spy samples: {total}")
    print(f"the engine's own thread CPU per image (the replica's /metrics, the whole run): {timing['engine_cpu']} ms")
    by_name: Counter = Counter()
    for tid, (name, used) in threads1.items():
        by_name[name if tid != pid else "main thread"] += used - threads0.get(tid, (name, 0.0))[1]
    print("replica CPU by thread name (ms per image): " + ", ".join(
        f"{name} {1e3 * used / n:.2f}" for name, used in by_name.most_common() if used > 0.005 * cpu))
    busiest = sorted(((used - threads0.get(tid, (name, 0.0))[1], tid, name) for tid, (name, used) in threads1.items()),
                     reverse=True)[:6]
    print("busiest threads (ms per image): " + ", ".join(f"{tid} {name} {1e3 * used / n:.2f}" for used, tid, name in busiest))
    show_samples(total, top, groups, packages, args.top)
    return 0


def show_samples(total: int, top: list, groups: list, packages: list, n_top: int) -> None:
    print(f"\nsamples: {total}; inclusive, by group (a sample may be in several):")
    for name, c in groups:
        print(f"  {100 * c / total:5.1f} %  {name}")
    print("\nself time by package (each sample's innermost frame), 1 % and over:")
    print("  " + ", ".join(f"{name} {100 * c / total:.1f} %" for name, c in packages if c >= 0.01 * total))
    print(f"\nself time, top {n_top} frames:")
    for frame, c in top:
        print(f"  {100 * c / total:5.1f} %  {frame[:150]}")


if __name__ == "__main__":
    sys.exit(main())
