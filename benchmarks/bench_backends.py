"""Cascades on inference backends: do FLOPs savings become wall-clock savings on CPU?

    python benchmarks/bench_backends.py --zoo fashion-mnist --images 512
    python benchmarks/bench_backends.py --zoo imagenet-lite --images 64

For every base the selector gives a saver (zero loss on calib, pairs, FLOPs cost or ``--cost``), on each backend
and batch size: the base alone, the cascade, and the saver alone run on the same images,
interleaved (base, cascade, saver, base, cascade, saver, …) for ``--repeats`` repetitions. Each
repetition gives a speedup (base / cascade) and an ideal time, saver + (1 − exit ratio) · base,
from the stage times of that same repetition; medians and min–max spreads are printed. A noisy
neighbour slows the three runs of a repetition alike, so it cannot fake a ratio.

``--threads 1,2`` runs the saver's runtime on 1 thread and the base's on 2 (in all three runs).

ONNX Runtime sessions made by tinysaver keep idle threads from spinning, which suits a cascade but
slows a model run alone. So on onnxruntime two more runs join each repetition: the base alone and
the cascade, each with the base's session spinning (ONNX Runtime's default). The last column then
compares the faster cascade with the faster base: what a user who tunes both would see.
Also printed: export time and resident memory per backend, the cascade on the fastest backend against
the base on eager (what a user runs today), and the issue's goals.
"""
from __future__ import annotations

import time

import numpy as np

from tinysaver.cascade import Cascade
from tinysaver.data import load_dataset
from tinysaver.selector import SelectorConfig, select_all
from tinysaver.zoo import load_zoo
from common import parser, table_head


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(cascade: Cascade, images, bs: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    res = cascade.predict(images, batch_size=bs)
    return time.perf_counter() - t0, res.stage


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--split", default=None, help="images to run (default: test, or the zoo's first split)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--backends", default="eager,onnxruntime,openvino")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bases", nargs="*", help="only these bases")
    ap.add_argument("--cost", default="flops",
                    help="the selector's cost, e.g. latency:cpu:bs1:onnxruntime (default: flops)")
    ap.add_argument("--threads", default=None,
                    help="SAVER,BASE intra-op threads of the onnxruntime/openvino stages, used alike by the base "
                         "alone, the saver alone and the cascade (default: torch's thread count for both)")
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    split = args.split or ("test" if "test" in zoo.splits else next(iter(zoo.splits)))
    images = load_dataset(zoo.splits[split]["source"], progress=False, limit=args.images).images
    backends = args.backends.split(",")
    t_saver, t_base = map(int, args.threads.split(",")) if args.threads else (None, None)

    def threads(b: str, t: int | None) -> int | None:
        return t if b in ("onnxruntime", "openvino") else None
    sels, _ = select_all(zoo, SelectorConfig(cost=args.cost))
    sels = [s for s in sels if s.found and (not args.bases or s.base in args.bases)]
    print(f"zoo {args.zoo}: {len(images)} {split} images, backends {', '.join(backends)}, batch sizes "
          f"{args.batch_sizes}, {args.repeats} interleaved repetitions; speedups are medians (min–max); runtime "
          f"threads saver {t_saver or 'default'}, base {t_base or 'default'}; savers selected on {args.cost}")
    models = {}
    for sel in sels:
        for m in sel.models:
            models.setdefault(m, zoo.load_model(m))
    # export (or load from the cache) once per model and backend, noting time and memory
    table_head("\n| backend | models | export s (total, this run) | from cache | resident MB added |")
    for b in backends:
        before = rss_mb()
        cas = [Cascade([models[m]], [], backend=b) for m in models]
        print(f"| {b} | {len(cas)} | {sum(c._runners[0].export_s for c in cas):.1f} | "
              f"{sum(c._runners[0].cached for c in cas)} | {rss_mb() - before:.0f} |")
    table_head("\n| base ← saver | FLOPs saving | batch | backend | base img/s | cascade img/s | speedup | ideal | "
          "of ideal | exit ratio | best cascade / best base, spinning or not |")
    goals = []
    for sel in sels:
        saver, base = sel.models[0], sel.base
        if len(sel.models) != 2:
            continue
        best = {}
        for bs in args.batch_sizes:
            eager_base = None
            for b in backends:
                ts_, tb_ = threads(b, t_saver), threads(b, t_base)
                base_only = Cascade([models[base]], [], backend=b, threads=tb_)
                saver_only = Cascade([models[saver]], [], backend=b, threads=ts_)
                cascade = Cascade([models[saver], models[base]], sel.thresholds, backend=b, threads=[ts_, tb_])
                runs = [base_only, cascade, saver_only]
                if b == "onnxruntime":  # the same two, with the base's session spinning
                    runs += [Cascade([models[base]], [], backend=b, threads=tb_, spin=True),
                             Cascade([models[saver], models[base]], sel.thresholds, backend=b, threads=[ts_, tb_],
                                     spin=[False, True])]
                for c in runs:  # warm-up
                    c.predict(images[: min(len(images), 4 * bs)], batch_size=bs)
                times = [[] for _ in runs]
                for _ in range(args.repeats):
                    for c, t in zip(runs, times):
                        secs, stage = timed(c, images, bs)
                        t.append(secs)
                        if c is cascade:
                            exit_ratio = float((stage == 0).mean())
                tb, tc, ts, *spin = map(np.array, times)
                ideal = ts + (1 - exit_ratio) * tb
                sp, idl, of = tb / tc, tb / ideal, ideal / tc
                best_vs_best = "—"
                if spin:
                    bb = np.minimum(tb, spin[0]) / np.minimum(tc, spin[1])
                    best_vs_best = (f"{np.median(bb):.2f}× ({bb.min():.2f}–{bb.max():.2f}); with spinning the base runs "
                                    f"{np.median(tb / spin[0]):.2f}× and the cascade {np.median(tc / spin[1]):.2f}× as fast")
                n = len(images)
                print(f"| {base} ← {saver} | {sel.saving_pct:.1f}% | {bs} | {b} | {n / np.median(tb):.1f} | "
                      f"{n / np.median(tc):.1f} | {np.median(sp):.2f}× ({sp.min():.2f}–{sp.max():.2f}) | "
                      f"{np.median(idl):.2f}× | {np.median(of):.2f} ({of.min():.2f}–{of.max():.2f}) | {exit_ratio:.1%} | "
                      f"{best_vs_best} |", flush=True)
                if b == "eager":
                    eager_base = np.median(tb)
                best.setdefault(bs, []).append((np.median(tc), b, np.median(sp), np.median(of)))
            t_best, b_best, _, _ = min(best[bs])
            if eager_base is not None:
                goals.append((base, saver, sel.saving_pct, bs, b_best, eager_base / t_best, best[bs]))
    table_head("\n| base ← saver | batch | fastest backend for the cascade | cascade there vs base on eager |")
    for base, saver, _, bs, b_best, ratio, _ in goals:
        print(f"| {base} ← {saver} | {bs} | {b_best} | {ratio:.2f}× |")
    print("\ngoals (issue 11):")
    for base, saver, saving, bs, b_best, ratio, rows in goals:
        for t_c, b, sp, of in rows:
            if saving >= 50 and bs in (1, 128):
                print(f"  {base} bs{bs} {b}: cascade faster than base on the same backend: "
                      f"{'yes' if sp > 1 else 'NO'} ({sp:.2f}×)")
            if of < 0.95:
                print(f"  {base} bs{bs} {b}: of ideal {of:.3f} < 0.95")
        if base == "resnet10t" and bs == 1:
            print(f"  resnet10t bs1: fastest-backend cascade vs eager base {ratio:.2f}× (goal ≥ 5×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
