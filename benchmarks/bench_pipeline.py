"""Does running the base in its own thread (``Cascade.predict(pipeline=True)``) make cascades faster?

    python benchmarks/bench_pipeline.py --zoo fashion-mnist --images 512 --repeats 7

At batch 1 the sequential cascade leaves a core idle while the single-thread saver runs, and
switching one session between saver and base costs time (bench_alternation.py). The pipelined
cascade runs the saver on batch k + 1 in one thread while the base runs survivors of batch k in
another, each on ``--pipeline-threads`` intra-op threads. Per saver–base pair, backend and batch
size, interleaved for ``--repeats`` repetitions on the same decoded images:

- the base alone on ``--threads``' base count, with tinysaver's non-spinning sessions and, on ONNX
  Runtime, with the runtime's default spinning: the faster of the two is "best base";
- the sequential cascade (``--threads`` SAVER,BASE) and the pipelined one (``--pipeline-threads``);
- the saver alone (on ``--threads``' saver count), for the ideal time of issue 11:
  saver + (1 − exit ratio) · best base, from the same repetition;
- with ``--eager-base``, the base alone on eager too: what a user runs today.

Eager and compile stages share torch's one thread pool, set with ``torch.set_num_threads`` for
each run: the base alone runs on ``--threads``' base count and on the pipeline's count (the faster
is "best base"), the sequential cascade and the saver alone on the base count, the pipelined
cascade on the pipeline's count (give it as N,N).

Printed: ms per image (medians), each cascade's speedup over the best base and its share of the
ideal (ideal / cascade time), medians (min–max), and with ``--eager-base`` the pipelined cascade
against the eager base.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tinysaver.cascade import Cascade
from tinysaver.data import load_dataset
from tinysaver.selector import SelectorConfig, select_all
from tinysaver.zoo import load_zoo
from common import parser, table_head


def timed(cascade: Cascade, images, bs: int, pipeline: bool, torch_threads: int) -> tuple[float, np.ndarray]:
    torch.set_num_threads(torch_threads)
    t0 = time.perf_counter()
    res = cascade.predict(images, batch_size=bs, pipeline=pipeline)
    return time.perf_counter() - t0, res.stage


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--backends", default="onnxruntime")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bases", nargs="*", help="only these bases")
    ap.add_argument("--threads", default="1,2", help="SAVER,BASE threads of the sequential cascade and the bases")
    ap.add_argument("--pipeline-threads", default="1,1", help="SAVER,BASE threads of the pipelined cascade")
    ap.add_argument("--eager-base", action="store_true", help="also time the base alone on eager")
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    split = "test" if "test" in zoo.splits else next(iter(zoo.splits))
    images = load_dataset(zoo.splits[split]["source"], progress=False, limit=args.images).images
    t_saver, t_base = map(int, args.threads.split(","))
    p_saver, p_base = map(int, args.pipeline_threads.split(","))
    sels = [s for s in select_all(zoo, SelectorConfig())[0]
            if s.found and len(s.models) == 2 and (not args.bases or s.base in args.bases)]
    print(f"zoo {args.zoo}: {len(images)} {split} images, {args.repeats} interleaved repetitions, savers selected "
          f"on flops; sequential cascade and bases on threads {t_saver},{t_base}, pipelined cascade on "
          f"{p_saver},{p_base}; speedups over the best base are medians (min–max)\n")
    table_head("| base ← saver | backend | batch | exit ratio | best base ms/img | sequential ms/img | pipelined ms/img | "
          "sequential / best base | pipelined / best base | sequential of ideal | pipelined of ideal | "
          "pipelined / eager base |")
    default = torch.get_num_threads()
    for sel in sels:
        saver, base = (zoo.load_model(k) for k in sel.models)
        for b in args.backends.split(","):
            # each run: (cascade, pipelined?, torch's thread count while it runs)
            if b in ("eager", "compile"):
                # their stages share torch's one global pool, so a stage cannot have its own count:
                # the base alone runs on both counts (the faster is best base), the sequential
                # cascade and the saver alone on the base's, the pipelined cascade on the pipeline's
                if p_saver != p_base:
                    raise SystemExit(f"{b} stages share torch's thread pool: give --pipeline-threads N,N")
                bases = [(Cascade([base], [], backend=b), False, n) for n in sorted({t_base, p_base})]
                saver_only = (Cascade([saver], [], backend=b), False, t_base)
                seq = (Cascade([saver, base], sel.thresholds, backend=b), False, t_base)
                pipe = (Cascade([saver, base], sel.thresholds, backend=b), True, p_base)
            else:
                bases = [(Cascade([base], [], backend=b, threads=t_base, spin=spin), False, default)
                         for spin in ([False, True] if b == "onnxruntime" else [False])]
                saver_only = (Cascade([saver], [], backend=b, threads=t_saver), False, default)
                seq = (Cascade([saver, base], sel.thresholds, backend=b, threads=[t_saver, t_base]), False, default)
                pipe = (Cascade([saver, base], sel.thresholds, backend=b, threads=[p_saver, p_base]), True, default)
            eager = [(Cascade([base], []), False, default)] if args.eager_base else []
            for bs in args.batch_sizes:
                runs = bases + eager + [saver_only, seq, pipe]
                for c, p, n in runs:  # warm-up
                    torch.set_num_threads(n)
                    c.predict(images[: min(len(images), 4 * bs)], batch_size=bs, pipeline=p)
                timings = [[timed(c, images, bs, p, n) for c, p, n in runs] for _ in range(args.repeats)]
                torch.set_num_threads(default)
                times = np.array([[secs for secs, _ in row] for row in timings])
                best = times[:, : len(bases)].min(axis=1)
                t_saver_only, ts, tp = times[:, -3], times[:, -2], times[:, -1]
                exit_ratio = float((timings[0][-2][1] == 0).mean())  # the sequential cascade's (the pipeline's is equal)
                ideal = t_saver_only + (1 - exit_ratio) * best
                per = 1e3 / len(images)

                def spread(r: np.ndarray, unit: str = "") -> str:
                    return f"{np.median(r):.2f}{unit} ({r.min():.2f}–{r.max():.2f})"
                vs_eager = spread(times[:, len(bases)] / tp, "×") if eager else "—"
                print(f"| {sel.base} ← {sel.models[0]} | {b} | {bs} | {exit_ratio:.1%} | {np.median(best) * per:.3f} | "
                      f"{np.median(ts) * per:.3f} | {np.median(tp) * per:.3f} | {spread(best / ts, '×')} | "
                      f"{spread(best / tp, '×')} | {spread(ideal / ts)} | {spread(ideal / tp)} | {vs_eager} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
