"""The ``imagenet-catalog`` zoo: the TinySaver paper's model pool with timm's published numbers.

The pool is listed in the paper's appendix (section 6.1; ``../shared/seeds/000_*``). ResNets use
torchvision's weights there, which timm serves as ``resnetNN.tv_in1k``; every other model uses
timm's default weights. Top-1, params and GMACs come from timm's tables (see
`tinysaver.published`), so these entries are marked ``published``, not ``measured``.
``tinysaver profile --model NAME --pretrained`` measures any of them for users with the weights.

Build it with ``python -m tinysaver.catalog``.
"""
from __future__ import annotations

import pandas as pd

from .published import BENCHMARK_CSV, RESULTS_CSV, SOURCE, results_dir
from .errors import NotFoundError

# Architecture → pretrained tag. The appendix lists EfficientViT (MSRA) m1–m5 and names m0 as the
# smallest pool member, so m0 is included too.
PAPER_POOL: dict[str, str] = {
    **{f"convnextv2_{s}": "fcmae_ft_in1k" for s in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")},
    **{f"davit_{s}": "msft_in1k" for s in ("tiny", "small", "base")},
    **{f"maxvit_{s}_tf_224": "in1k" for s in ("tiny", "small", "base", "large")},
    **{f"swin_{s}_patch4_window7_224": "ms_in1k" for s in ("tiny", "small", "base")},
    "swin_large_patch4_window7_224": "ms_in22k_ft_in1k",  # Swin-L has no in1k-only weights
    **{f"resnet{d}": "tv_in1k" for d in (18, 34, 50, 101, 152)},
    "efficientnet_b0": "ra_in1k", "efficientnet_b1": "ft_in1k", "efficientnet_b2": "ra_in1k",
    "efficientnet_b3": "ra2_in1k", "efficientnet_b4": "ra2_in1k",
    **{f"efficientvit_b{i}": "r224_in1k" for i in range(4)},
    **{f"efficientvit_m{i}": "r224_in1k" for i in range(6)},
    **{f"efficientformerv2_{s}": "snap_dist_in1k" for s in ("s0", "s1", "s2", "l")},
    "mobilenetv3_small_100": "lamb_in1k", "mobilenetv3_large_100": "ra_in1k",
}


def catalog_entries(folder=None) -> dict[str, dict]:
    """One published entry per pool model; raises if a model is missing from the tables."""
    folder = folder or results_dir()
    res = pd.read_csv(folder / RESULTS_CSV).set_index("model")
    bench = pd.read_csv(folder / BENCHMARK_CSV)
    out = {}
    for arch, tag in PAPER_POOL.items():
        name = f"{arch}.{tag}"
        if name not in res.index:
            cands = [m for m in res.index if m.startswith(arch + ".")]
            raise NotFoundError(f"{name} not in {RESULTS_CSV}; candidates: {cands}")
        rows = res.loc[[name]]
        # some weights are listed at several test sizes: prefer the paper's 224 px
        r = rows[rows["img_size"] == 224].iloc[0] if (rows["img_size"] == 224).any() else rows.iloc[0]
        size = int(r["img_size"])
        b = bench[(bench["model"] == arch) & (bench["infer_img_size"] == size)]
        if b.empty:
            raise NotFoundError(f"{arch} at {size}px not in {BENCHMARK_CSV}")
        gmacs = float(b["infer_gmacs"].iloc[0])
        out[name] = {
            "source": {"kind": "timm", "name": name, "pretrained": True},
            "published": {"top1": float(r["top1"]), "top5": float(r["top5"]), "params_M": float(r["param_count"]),
                          "gmacs": gmacs, "img_size": size, "crop_pct": float(r["crop_pct"]),
                          "interpolation": str(r["interpolation"]), "source": f"{SOURCE}: {RESULTS_CSV}, {BENCHMARK_CSV}"},
            "params": int(round(float(r["param_count"]) * 1e6)),
            "macs": int(round(gmacs * 1e9)),
            "flops": int(round(2 * gmacs * 1e9)),
            "accuracy": {"imagenet-val (published)": float(r["top1"]) / 100},
        }
    return out


def main() -> int:
    from .profiler import add_published

    entries = catalog_entries()
    path = add_published("imagenet-catalog", entries, description=(
        f"TinySaver paper pool ({len(entries)} models, appendix 6.1) with published timm numbers; not measured here"))
    print(f"{len(entries)} published entries written to {path}")
    return 0


__all__ = ["PAPER_POOL", "catalog_entries", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
