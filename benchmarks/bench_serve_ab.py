"""Two versions of the fused service side by side on one Ray instance, their runs alternating.

    python benchmarks/bench_serve_ab.py --before 9f021a4 --rounds 6
    python benchmarks/bench_serve_ab.py --before 9f021a4 --after 296089b --rounds 6
    python benchmarks/bench_serve_ab.py --before 9f021a4 --zoo imagenet-lite \\
        --base tf_efficientnet_lite2.pypi_in1k --split val --requests 96 --batch-images 192 --rounds 4

On the project's 2-core VM the same code runs up to 1.5× faster or slower from one minute to the
next (a run of ``bench_serve_layouts.py`` against itself), so a before/after taken minutes apart
measures the machine. Here both versions serve at once, behind the same proxy, each from its own
checkout (``git worktree`` of a commit; ``--after`` defaults to this working tree), and every round
drives each in turn: ``/predict`` at ``--concurrency``, then ``/predict/batch`` (16 images per
request) at each of ``--batch-concurrency``, with the order of the two versions swapped every
round. It prints each figure per round and the after/before ratio per round, with the median.

Each version is deployed by a driver of its own, with ``PYTHONPATH`` set to its checkout and a
working directory without one (Ray puts a driver's working directory first on its workers' path),
and its replicas inherit that. The ``batch_sizes`` keys of each app's ``/metrics`` are printed so
that a reader can tell that each side ran its own code where those differ.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadgen import batch_loop, drive, encoded_images, start_local_ray
from common import parser, table_head

ROOT = Path(__file__).resolve().parent.parent

DEPLOY = '''
import sys
import ray
from ray import serve
import tinysaver
from tinysaver.selector import SelectorConfig, select
from tinysaver.serve import ServeOptions, build_app
from tinysaver.zoo import load_zoo
name, zoo_dir, base, address = sys.argv[1:5]
zoo = load_zoo(zoo_dir)
sel = select(zoo, base, SelectorConfig()).best
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": sys.argv[5]}})
o = ServeOptions(layout="fused", num_cpus=float(sys.argv[6]), max_batch_size=16, batch_wait_timeout_s=0.005)
serve.run(build_app(sel, zoo, o), name=name, route_prefix="/" + name, blocking=False)
print(name, "deployed from", tinysaver.__file__, flush=True)
'''


def checkout(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` under ``where`` (removed by the caller)."""
    path = where / f"tree-{rev}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--before", required=True, help="a git revision")
    ap.add_argument("--after", default=None, help="a git revision (default: this working tree)")
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--split", default="test")
    ap.add_argument("--requests", type=int, default=400, help="/predict requests per run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch-images", type=int, default=800, help="images per /predict/batch run")
    ap.add_argument("--batch-concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--fused-cpus", type=float, default=0.3)
    args = ap.parse_args()

    import ray
    from ray import serve

    from tinysaver.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    bodies, _ = encoded_images(zoo, args.split, min(1000, max(args.requests, args.batch_images)))
    work = Path(tempfile.mkdtemp(prefix="tinysaver-ab-"))
    trees, made = {}, []
    try:
        trees["before"] = checkout(args.before, work)
        made.append(trees["before"])
        if args.after:
            trees["after"] = checkout(args.after, work)
            made.append(trees["after"])
        else:
            trees["after"] = ROOT
        os.chdir(work)  # not a checkout: neither version's code comes first on the workers' path
        port = start_local_ray(args.ray_cpus)
        address = ray.get_runtime_context().gcs_address
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, "-c", DEPLOY, name, str(zoo.path), args.base, address, str(tree),
                                  str(args.fused_cpus)], cwd=work, env={**os.environ, "PYTHONPATH": str(tree)},
                                 capture_output=True, text=True, timeout=600)
            if out.returncode:
                raise RuntimeError(f"deploying {name} failed: {out.stderr[-2000:]}")
            print(out.stdout.strip().splitlines()[-1], flush=True)
        import httpx

        url = {n: f"http://127.0.0.1:{port}/{n}" for n in trees}
        for n in trees:
            for _ in range(300):  # the replica loads its models after serve.run returns
                try:
                    if httpx.get(url[n] + "/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            drive(url[n] + "/predict", bodies, 4, 32)  # warm-up
        print(f"{args.zoo}, base {args.base}: before {args.before}, after {args.after or 'working tree'}; "
              f"/predict at concurrency {args.concurrency} ({args.requests} requests), /predict/batch 16 images "
              f"per request at {args.batch_concurrency} ({args.batch_images} images); load before "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        kinds = [f"/predict c{args.concurrency}"] + [f"/predict/batch c{c}" for c in args.batch_concurrency]
        res: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            for n in (("after", "before") if rnd % 2 == 0 else ("before", "after")):
                t, _ = drive(url[n] + "/predict", bodies, args.concurrency, args.requests)
                res.setdefault((n, kinds[0]), []).append(args.requests / t)
                for c, kind in zip(args.batch_concurrency, kinds[1:]):
                    rate = asyncio.run(batch_loop(url[n] + "/predict/batch", bodies, 16, c, args.batch_images))
                    res.setdefault((n, kind), []).append(rate)
            print(f"  round {rnd + 1}: " + ", ".join(f"{n} {k} {res[n, k][-1]:.1f}" for k in kinds
                                                     for n in ("before", "after")) +
                  f" img/s; load {os.getloadavg()[0]:.2f}", flush=True)
        for n in trees:
            keys = sorted(httpx.get(url[n] + "/metrics.json", timeout=30).json()["batch_sizes"])
            print(f"{n}: /metrics batch_sizes keys {keys}")
        table_head("\n| route | before img/s, median | after img/s, median | after / before per round | median |")
        for k in kinds:
            ratios = [a / b for a, b in zip(res["after", k], res["before", k])]
            print(f"| {k} | {np.median(res['before', k]):.1f} | {np.median(res['after', k]):.1f} | "
                  + " ".join(f"{r:.2f}" for r in ratios) + f" | {np.median(ratios):.2f} |")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        os.chdir(ROOT)
        for tree in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
