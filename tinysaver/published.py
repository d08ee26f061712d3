"""Published facts from timm's result tables (huggingface/pytorch-image-models ``results/``).

The tables are read from ``data/timm-results`` of the shared data folder (``../shared`` beside the
checkout, or ``$TINYSAVER_SHARED``), or from ``$TINYSAVER_TIMM_RESULTS``; they are not copied into
the project.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from .errors import NotFoundError

BENCHMARK_CSV = "benchmark-infer-amp-nchw-pt291-cu128-4090.csv"
RESULTS_CSV = "results-imagenet.csv"
SOURCE = "timm results/ (huggingface/pytorch-image-models, commit aa4b585)"


def shared_dir() -> Path:
    """The shared data folder (timm's tables, the ImageNet sample): ``$TINYSAVER_SHARED``, or
    ``shared/`` beside the checkout."""
    env = os.environ.get("TINYSAVER_SHARED")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared"


def results_dir() -> Path:
    env = os.environ.get("TINYSAVER_TIMM_RESULTS")
    if env:
        return Path(env)
    return shared_dir() / "data" / "timm-results"


def published_gmacs(arch: str, img_size: int = 224, folder: Path | None = None) -> float:
    """GMACs that timm's GPU benchmark table lists for ``arch`` at ``img_size``."""
    df = pd.read_csv((folder or results_dir()) / BENCHMARK_CSV)
    row = df[(df["model"] == arch) & (df["infer_img_size"] == img_size)]
    if row.empty:
        raise NotFoundError(f"{arch} at {img_size}px is not in {BENCHMARK_CSV}")
    return float(row["infer_gmacs"].iloc[0])


__all__ = ["BENCHMARK_CSV", "RESULTS_CSV", "SOURCE", "shared_dir", "results_dir", "published_gmacs"]
