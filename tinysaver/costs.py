"""The cost model: what one image costs on a zoo model.

``flops``: the entry's FLOPs per image. ``latency:DEVICE:bsN[:BACKEND]``: milliseconds per image,
the measured time of a batch of N on DEVICE (``tinysaver profile --latency-only``) divided by N; the
backend defaults to the eager one. The selector's relative costs are ratios of these numbers, so
the unit never matters, only that every model of a selection uses the same one.
"""
from __future__ import annotations

import warnings
from typing import Sequence

from .backends import DEFAULT_BACKEND
from .policy import SelectionError
from .zoo import Zoo


def model_cost(zoo: Zoo, model: str, cost: str) -> float:
    """Cost per image of ``model``: FLOPs, or latency in ms/image from ``latency:DEVICE:bsN``."""
    e = zoo.entry(model)
    if cost == "flops":
        if not e.flops:
            raise SelectionError(f"{model!r} has no FLOPs in zoo {zoo.name!r}")
        return float(e.flops)
    if cost.startswith("latency:"):
        parts = cost.split(":")
        if len(parts) not in (3, 4) or not parts[2].startswith("bs") or not parts[2][2:].isdigit():
            raise SelectionError(f"latency cost must look like latency:cpu:bs1 or latency:cpu:bs1:onnxruntime, got {cost!r}")
        backend = parts[3] if len(parts) == 4 else DEFAULT_BACKEND
        lat = (e.backends.get(backend) or {}).get("latency")
        if lat is None and backend == DEFAULT_BACKEND:  # its latency is also the entry's own
            lat = e.latency or {}
        if lat is None:
            raise SelectionError(f"{model!r} has no latency on backend {backend!r} in zoo {zoo.name!r}; measure it with "
                                 f"'tinysaver profile --latency-only --zoo {zoo.name} --backends {backend}'")
        if lat.get("device") != parts[1]:
            raise SelectionError(f"{model!r} has latency measured on {lat.get('device')!r}, not {parts[1]!r}")
        row = (lat.get("table") or {}).get(parts[2])
        if not row:
            raise SelectionError(f"{model!r} has no latency at {parts[2]} on {backend}; measured: "
                                 f"{', '.join(lat.get('table') or {})}")
        if row.get("noisy"):
            warnings.warn(f"{model!r}: its {parts[2]} latency on {backend} was timed on a busy machine ({row['noisy']}); "
                          f"re-time it with 'tinysaver profile --latency-only --noisy-only --zoo {zoo.name} "
                          f"--backends {backend}'", stacklevel=2)
        return float(row["ms_per_batch"]) / int(parts[2][2:])
    raise SelectionError(f"cost must be 'flops' or 'latency:DEVICE:bsN[:BACKEND]', got {cost!r}")


def available_costs(zoo: Zoo, models: Sequence[str], cost: str) -> dict[str, float]:
    """Costs of the models that have this cost measured (a backend's latency may cover only some)."""
    out = {}
    for m in models:
        try:
            out[m] = model_cost(zoo, m, cost)
        except SelectionError:
            if not cost.startswith("latency:"):
                raise
    return out


__all__ = ["model_cost", "available_costs"]
