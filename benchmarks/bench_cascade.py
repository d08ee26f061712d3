"""Cascade throughput against the base alone, and against the ideal from stage latencies.

    python benchmarks/bench_cascade.py --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k
    python benchmarks/bench_cascade.py --zoo fashion-mnist --base resnet10t [--cost latency:cpu:bs128]

The threshold comes from the selector (zero loss on the calibration split). Images are decoded
once before timing; each timed run includes every stage's own preprocessing. The ideal time per
image is t(saver) + (1 − exit ratio) · t(base), from the stages timed alone on the same images.
"no refill" is the same cascade sending each input chunk's survivors on at once (the baseline for
refill, which holds survivors until they fill a batch).
"""
from __future__ import annotations

import torch

from tinysaver.cascade import build_cascade, compare_with_base
from tinysaver.data import load_dataset
from tinysaver.selector import SelectorConfig, select
from tinysaver.zoo import load_zoo
from common import parser, table_head


def main() -> int:
    ap = parser("imagenet-lite")
    ap.add_argument("--base", default="tf_efficientnet_lite2.pypi_in1k")
    ap.add_argument("--dataset", help="dataset URI of the images (default: the zoo's held-out split source)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cost", default="flops", help="the selector's cost: flops or latency:cpu:bsN")
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig(criterion="zero", max_stages=2, cost=args.cost)).best
    if not sel.found:
        print(sel.message)
        return 1
    uri = args.dataset or zoo.splits.get("test", next(iter(zoo.splits.values())))["source"]
    data = load_dataset(uri, progress=False, limit=args.images)
    cas = build_cascade(sel, zoo)
    print(f"{args.zoo}: {sel.savers[0].model} (conf ≥ {sel.savers[0].threshold:.4f}) → {args.base}; "
          f"{len(data)} images from {uri}; torch threads {torch.get_num_threads()}")
    table_head("| batch | base img/s | cascade img/s | no refill img/s | refill gain | speedup | ideal speedup | "
          "cascade/ideal | exit ratio | base acc | cascade acc |")
    for r in compare_with_base(cas, data.images, data.labels, args.batch_sizes, args.reps):
        print(f"| {r['batch']} | {r['base_img_s']:.1f} | {r['cascade_img_s']:.1f} | {r['cascade_norefill_img_s']:.1f} | "
              f"{r['cascade_img_s'] / r['cascade_norefill_img_s']:.2f}x | {r['speedup']:.2f}x | "
              f"{r['ideal_speedup']:.2f}x | {r['of_ideal']:.2f} | {r['exit_ratio']:.1%} | "
              f"{100 * r['base_acc']:.2f}% | {100 * r['cascade_acc']:.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
