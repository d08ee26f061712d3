"""What profiling a zoo will cost, on paper: wall time and GPU-hours, before anything runs.

Throughput per model comes from timm's published inference benchmark for the chosen device
(``benchmark-infer-amp-nchw-*-<device>.csv`` in the timm results folder, see
`tinysaver.published`) at the model's image size. A model the table does not list is scaled
by its GMACs: img/s = R / GMACs, where R is the median of img/s × GMACs over the listed models.
GMACs come from the table, the imagenet-catalog zoo, or a zoo that measured the model.

The figures cover the forward passes only. Decoding JPEGs, loading weights and moving data add
to them; on ImageNet-val the decode usually needs several CPU cores per GPU to keep up.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import dataset_size
from .errors import UsageError
from .profiler import ProfileConfig
from .published import SOURCE, results_dir
from .zoo import default_root, list_zoos, load_zoo


@dataclass
class CostRow:
    model: str
    img_size: int
    gmacs: float
    img_per_s: float
    how: str        # "published" or "GMACs-scaled"
    samples: int
    gpu_hours: float


@dataclass
class ProfileCost:
    rows: list[CostRow]
    gpus: int
    gpu_type: str
    shards: int
    wall_hours: float
    gpu_hours: float
    table: str


def gpu_benchmarks(folder: Path | None = None) -> dict[str, Path]:
    """Device name → timm's published GPU inference benchmark file, e.g. {"rtx4090": …}."""
    folder = folder or results_dir()
    out = {}
    for f in sorted(folder.glob("benchmark-infer-amp-*.csv")):
        m = re.search(r"-cu\d+-(.+)\.csv$", f.name)
        if m:
            dev = m.group(1)
            out[("rtx" + dev) if dev.isdigit() else dev] = f
    return out


def _catalog_facts(root: Path | None) -> dict[str, dict]:
    """Per model key: img_size and GMACs from the catalog's published entries and any measured zoo."""
    facts: dict[str, dict] = {}
    for name in list_zoos(root or default_root()):
        try:
            z = load_zoo(name, root)
        except Exception:  # a broken zoo never stops a plan
            continue
        for key in z.models:
            e = z.entry(key)
            pub = e.published or {}
            size = pub.get("img_size") or ((e.preprocess or {}).get("input_size") or [None, None, None])[-1]
            macs = e.macs
            if macs:
                facts.setdefault(key, {"gmacs": float(macs) / 1e9, "img_size": size})
    return facts


def profile_cost(cfg: ProfileConfig, gpus: int = 1, gpu_type: str = "rtx4090", shards: int | None = None,
                 root: Path | None = None, folder: Path | None = None) -> ProfileCost:
    """Expected GPU-hours and wall time to profile every model of ``cfg`` on ``gpus`` GPUs.

    Samples per split come from ``cfg.split_sizes`` when given (for data this machine cannot
    read), else from listing the data. The wall time schedules the model × shard units
    (``shards`` per split, default one per GPU) longest first on the GPUs.
    """
    if gpus < 1:
        raise UsageError(f"plan for at least one GPU, got {gpus}")
    benches = gpu_benchmarks(folder)
    if gpu_type not in benches:
        raise UsageError(f"no published benchmark for GPU type {gpu_type!r}; available: {', '.join(benches) or 'none'} "
                         f"(in {folder or results_dir()})")
    bench = pd.read_csv(benches[gpu_type])
    rate = float(np.median(bench["infer_samples_per_sec"] * bench["infer_gmacs"]))  # GMAC/s, the scaling constant
    sizes = {s: int((cfg.split_sizes or {}).get(s) or dataset_size(uri, cfg.limit)) for s, uri in cfg.splits.items()}
    samples = sum(sizes.values())
    facts = _catalog_facts(root)
    rows = []
    for spec in cfg.models:
        arch = spec.name.split(".")[0]
        known = facts.get(spec.key) or facts.get(spec.name) or {}
        size = int(spec.input_size or known.get("img_size") or 224)
        hit = bench[(bench["model"] == arch) & (bench["infer_img_size"] == size)]
        if not hit.empty:
            ips, gmacs, how = float(hit["infer_samples_per_sec"].iloc[0]), float(hit["infer_gmacs"].iloc[0]), "published"
        elif known.get("gmacs"):
            # GMACs grow with the pixel count when a model runs at another size than it was counted at
            gmacs = float(known["gmacs"]) * (size / int(known.get("img_size") or size)) ** 2
            ips, how = rate / gmacs, "GMACs-scaled"
        else:
            raise UsageError(f"{spec.key}: not in the published benchmark at {size}px and no GMACs known; profile it "
                             "locally once (tinysaver profile --limit 1) or add it to the catalog")
        rows.append(CostRow(spec.key, size, gmacs, ips, how, samples, samples / ips / 3600))
    shards = shards or gpus
    units = sorted((r.gpu_hours / shards for r in rows for _ in range(shards)), reverse=True)
    load = [0.0] * gpus
    heapq.heapify(load)
    for u in units:  # longest-processing-time-first onto the least loaded GPU
        heapq.heappush(load, heapq.heappop(load) + u)
    return ProfileCost(rows, gpus, gpu_type, shards, max(load), sum(r.gpu_hours for r in rows),
                       f"{SOURCE}: {benches[gpu_type].name}")


def format_profile_cost(cost: ProfileCost) -> str:
    lines = [f"| model | img px | GMACs | img/s on 1 {cost.gpu_type} | from | samples | GPU-hours |",
             "|---|---|---|---|---|---|---|"]
    for r in cost.rows:
        lines.append(f"| {r.model} | {r.img_size} | {r.gmacs:.2f} | {r.img_per_s:,.0f} | {r.how} | {r.samples:,} | "
                     f"{r.gpu_hours:.3f} |")
    lines.append("")
    lines.append(f"{len(cost.rows)} models: {cost.gpu_hours:.2f} GPU-hours; on {cost.gpus} × {cost.gpu_type} "
                 f"({cost.shards} shard(s) per split): {cost.wall_hours:.2f} h wall "
                 f"({cost.wall_hours * 60:.0f} min).")
    lines.append("Forward passes only, at the table's mixed precision and batch size: tinysaver profiles in fp32 at "
                 "eval_batch_size, which runs slower, and decoding and weight loading add to it.")
    lines.append(f"Throughput: {cost.table}")
    return "\n".join(lines)


__all__ = ["ProfileCost", "CostRow", "profile_cost", "format_profile_cost", "gpu_benchmarks"]
