"""Our FLOP counters against the GMACs timm publishes, and fvcore (the counter behind timm's table)
as an independent check. Random weights, 224 px.

    python benchmarks/flops_check.py

fvcore counts conv/matmul/linear MACs as we do, and adds one op per BatchNorm element and
bilinear upsampling; its total, rounded to 2 decimals, is the published figure.
"""
from __future__ import annotations

import logging

import timm
import torch

from tinysaver.measure import count_flops
from tinysaver.published import BENCHMARK_CSV, published_gmacs
from common import table_head

MODELS = ["resnet50", "efficientvit_m0", "swin_tiny_patch4_window7_224", "davit_tiny", "tf_efficientnet_lite0",
          "mobilenetv3_large_100", "efficientformerv2_s0"]


def fvcore_gmacs(m) -> tuple[float, float]:
    """(fvcore's total, its BatchNorm + upsample share), GMACs."""
    from fvcore.nn import FlopCountAnalysis

    logging.disable(logging.WARNING)
    try:
        fca = FlopCountAnalysis(m, torch.randn(1, 3, 224, 224))
        fca.unsupported_ops_warnings(False)
        by = fca.by_operator()
        return fca.total() / 1e9, (by.get("batch_norm", 0) + by.get("upsample_bilinear2d", 0)) / 1e9
    finally:
        logging.disable(logging.NOTSET)


def main() -> int:
    table_head(f"| model | published ({BENCHMARK_CSV}) | DeepSpeed | diff | torch fallback | diff "
          "| fvcore total | fvcore BN+upsample | DeepSpeed + that |")
    for arch in MODELS:
        pub = published_gmacs(arch, 224)
        m = timm.create_model(arch).eval()
        ds = count_flops(m, (3, 224, 224), "deepspeed").macs / 1e9
        tc = count_flops(m, (3, 224, 224), "torch").macs / 1e9
        fv, extra = fvcore_gmacs(m)
        print(f"| {arch} | {pub:.2f} | {ds:.4f} | {100 * (ds - pub) / pub:+.2f}% | {tc:.4f} | "
              f"{100 * (tc - pub) / pub:+.2f}% | {fv:.4f} | {extra:.4f} | {ds + extra:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
