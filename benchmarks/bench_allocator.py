"""Why large CPU batches of 224–260 px images run slower per image than batch 1, and whether a
different malloc fixes it.

    python benchmarks/bench_allocator.py --model tf_efficientnet_lite0 --batch-sizes 1 32 --repeats 5

Each configuration runs in its own subprocess (LD_PRELOAD must be set before the process starts):
glibc's malloc (the baseline), jemalloc (Debian libjemalloc2) and tcmalloc (libtcmalloc-minimal4).
The allocators are interleaved repetition by repetition, so a noisy neighbour hits all of them
alike. Prints the median ms per image with its min–max spread, the share of CPU time spent in the
kernel (page faults from mmap'd allocations show up there), and each allocator's speedup against
glibc measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import table_head

ALLOCATORS = {
    "glibc": None,
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}

CHILD = r"""
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import timm, torch
torch.set_num_threads(int(sys.argv[3]))
m = timm.create_model(sys.argv[1]).eval()
size = m.pretrained_cfg["input_size"][-1]
bs = int(sys.argv[2])
x = torch.randn(bs, 3, size, size)
with torch.inference_mode():
    for _ in range(max(3, 64 // bs)):  # warm-up: oneDNN picks and caches its kernels
        m(x)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < float(sys.argv[4]) or n < 3:
        m(x)
        n += 1
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
sys_s, user_s = r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime
print(json.dumps({"ms_per_image": 1e3 * dt / (n * bs), "sys_share": sys_s / max(sys_s + user_s, 1e-9), "size": size}))
"""


def run_once(model: str, bs: int, preload: str | None, threads: int, seconds: float) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(bs), str(threads), str(seconds)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed loop per run")
    args = ap.parse_args()
    allocs = {k: v for k, v in ALLOCATORS.items() if v is None or Path(v).is_file()}
    missing = sorted(set(ALLOCATORS) - set(allocs))
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (apt-get install -y libjemalloc2 libtcmalloc-minimal4)")
    results: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.repeats):
        for bs in args.batch_sizes:
            for name, path in allocs.items():  # interleaved: A B C A B C …
                results.setdefault((bs, name), []).append(run_once(args.model, bs, path, args.threads, args.seconds))
    size = next(iter(results.values()))[0]["size"]
    print(f"{args.model} at {size} px, eager fp32, {args.threads} threads, {args.repeats} interleaved repetitions "
          f"of ≥ {args.seconds:g} s each")
    table_head("| batch | malloc | ms / image, median (min–max) | kernel share of CPU time | speedup vs glibc |")
    for bs in args.batch_sizes:
        base = np.median([r["ms_per_image"] for r in results[(bs, "glibc")]])
        for name in allocs:
            ms = np.array([r["ms_per_image"] for r in results[(bs, name)]])
            sys_share = np.median([r["sys_share"] for r in results[(bs, name)]])
            print(f"| {bs} | {name} | {np.median(ms):.2f} ({ms.min():.2f}–{ms.max():.2f}) | {sys_share:.0%} | "
                  f"{base / np.median(ms):.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
