"""Per base model of the Fashion-MNIST zoo: saver and threshold chosen on calib (zero loss),
FLOPs saving, measured CPU throughput speedup at batch sizes 1 and 128, and test accuracy.

    python benchmarks/bench_fashion_zoo.py [--images 2000]
"""
from __future__ import annotations


import torch

from tinysaver.cascade import build_cascade, compare_with_base
from tinysaver.data import load_dataset
from tinysaver.selector import SelectorConfig, select_all
from tinysaver.zoo import load_zoo
from common import parser, table_head


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--images", type=int, default=2000, help="first N test images for the timing runs")
    ap.add_argument("--criterion", default="zero")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    sels, _ = select_all(zoo, SelectorConfig(criterion=args.criterion, max_stages=2))
    data = load_dataset(zoo.splits["test"]["source"], progress=False, limit=args.images)
    print(f"zoo {args.zoo}, criterion {args.criterion} on calib, accuracy on all of test, timing on the first "
          f"{len(data)} test images, torch threads {torch.get_num_threads()}")
    table_head("| base | saver | threshold | exit ratio (test) | FLOPs saving | speedup bs1 | speedup bs128 | "
          "test acc base | test acc cascade |")
    for sel in sels:
        if not sel.found:
            print(f"| {sel.base} | — ({sel.message}) | | | 0% | | | {100 * sel.acc_base_test:.2f}% | "
                  f"{100 * sel.acc_base_test:.2f}% |")
            continue
        rows = compare_with_base(build_cascade(sel, zoo), data.images, data.labels, (1, 128), args.reps)
        s = sel.savers[0]
        print(f"| {sel.base} | {s.model} | {s.threshold:.4f} | {sel.exit_ratio_test[0]:.1%} | "
              f"{sel.saving_pct:.1f}% | {rows[0]['speedup']:.2f}x | {rows[1]['speedup']:.2f}x | "
              f"{100 * sel.acc_base_test:.2f}% | {100 * sel.acc_cascade_test:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
