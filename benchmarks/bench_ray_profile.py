"""What does Ray cost on one machine? The Fashion-MNIST zoo's test split, profiled locally and on Ray.

    python benchmarks/bench_ray_profile.py [--shards 4] [--repeats 2]

Both runs do the same work: every model's predictions and FLOPs on the 10k test images, no
latency (the Ray backend leaves latency to ``--latency-only``), into fresh temporary zoos. Local
and Ray runs alternate (local, ray, local, ray, …) so that a noisy neighbour slows both alike; the
Ray time includes starting the local Ray instance only in the first repetition, which is
reported separately. Prints each wall time, the medians and the overhead ratio ray / local
(goal: ≤ 1.15).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from loadgen import start_ray
from tinysaver.profile_ray import profile_on_ray
from tinysaver.profiler import ProfileConfig, profile
from common import table_head

CONFIG = Path(__file__).resolve().parent.parent / "zoo_index" / "configs" / "fashion-mnist.yaml"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    cfg = dataclasses.replace(ProfileConfig.from_yaml(CONFIG), zoo="bench", splits={"test": "fashion-mnist:test"},
                              batch_sizes=[], eval_batch_size=256)
    t0 = time.perf_counter()
    start_ray(2)
    start_s = time.perf_counter() - t0
    local, on_ray = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            t0 = time.perf_counter()
            profile(cfg, Path(a), progress=False, log=lambda s: None)
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            counts = profile_on_ray(cfg, Path(b), shards=args.shards, progress=False, log=lambda s: None)
            on_ray.append(time.perf_counter() - t0)
            same = all(np.array_equal(np.load(Path(a) / "bench" / "preds" / m.key / "test.npz")["pred"],
                                      np.load(Path(b) / "bench" / "preds" / m.key / "test.npz")["pred"])
                       for m in cfg.models)
        print(f"repetition {r + 1}: local {local[-1]:.1f} s, ray {on_ray[-1]:.1f} s ({counts['units']} units), "
              f"same predictions: {same}", flush=True)
    ray.shutdown()
    lm, rm = float(np.median(local)), float(np.median(on_ray))
    print(f"\n{len(cfg.models)} models × 10,000 test images, {args.shards} shards, 2 CPUs")
    table_head(f"| backend | wall s (median of {args.repeats}) | all |")
    print(f"| local | {lm:.1f} | {', '.join(f'{t:.1f}' for t in local)} |")
    print(f"| ray | {rm:.1f} | {', '.join(f'{t:.1f}' for t in on_ray)} |")
    print(f"ray / local = {rm / lm:.2f} (goal ≤ 1.15); starting the local Ray instance took {start_s:.1f} s more")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
