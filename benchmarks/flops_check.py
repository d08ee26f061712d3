"""Both FLOP counters against the GMACs timm publishes, random weights, 224 px.

    python benchmarks/flops_check.py
"""
from __future__ import annotations

import timm

from tinysaver.measure import count_flops
from tinysaver.published import BENCHMARK_CSV, published_gmacs

MODELS = ["resnet50", "efficientvit_m0", "swin_tiny_patch4_window7_224", "davit_tiny", "tf_efficientnet_lite0"]


def main() -> int:
    print(f"| model | published GMACs ({BENCHMARK_CSV}) | DeepSpeed GMACs | diff | torch fallback GMACs | diff |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for arch in MODELS:
        pub = published_gmacs(arch, 224)
        m = timm.create_model(arch).eval()
        ds = count_flops(m, (3, 224, 224), "deepspeed").macs / 1e9
        tc = count_flops(m, (3, 224, 224), "torch").macs / 1e9
        d1, d2 = 100 * (ds - pub) / pub, 100 * (tc - pub) / pub
        worst = max(worst, abs(d1), abs(d2))
        print(f"| {arch} | {pub:.2f} | {ds:.4f} | {d1:+.2f}% | {tc:.4f} | {d2:+.2f}% |")
    print(f"largest disagreement: {worst:.2f}% (the table rounds GMACs to 2 decimals)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
