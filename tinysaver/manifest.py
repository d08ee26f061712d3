"""The typed entry of one model in a zoo manifest (``zoo.yaml``), checked when the zoo loads.

Like timm's ``PretrainedCfg``, a `ModelEntry` is the one typed description of a model that
travels with it: what it is, how it was built, what it costs and how accurate it was. The manifest
stays plain YAML that the profiler writes and people may edit by hand, so every entry is read
through its declared schema (`tinysaver.schemas.ModelEntrySchema`) on load, and a bad one is refused
in one line naming the file and the field path (``zoo.yaml: models.m1.flops: must be > 0, got -5``).
Units: ``params`` in parameters, ``flops``/``macs`` per image, latency ``ms_per_batch`` in
milliseconds, ``accuracy`` as a fraction in [0, 1] per split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZooError
from .schemas import STATUSES, ModelEntrySchema, parse

PREDICTED = ("measured", "imported")  # the statuses whose entries hold per-sample predictions


@dataclass(frozen=True)
class ModelEntry:
    """One model of a zoo. ``source`` says how to build it (see `ModelSpec`);
    ``backends`` holds per-backend agreement and latency; ``calibration`` the fitted temperature."""

    key: str
    status: str
    source: dict = field(default_factory=dict)
    num_classes: int | None = None
    preprocess: dict | None = None
    params: int | None = None
    flops: float | None = None
    macs: float | None = None
    flops_counter: str | None = None
    latency: dict | None = None
    accuracy: dict = field(default_factory=dict)
    calibration: dict | None = None
    backends: dict = field(default_factory=dict)
    published: dict | None = None
    profiled_on: str | None = None  # "ray" when profile --executor ray measured it
    imported: dict | None = None  # imported entries: the record files, their format and where the costs came from
    trained: dict | None = None  # a saver fine-tuned to defer (tinysaver saver train): from, for, settings, choice

    @classmethod
    def from_dict(cls, key: str, d: Any, file: Path | str = "zoo.yaml") -> "ModelEntry":
        """Check one manifest entry (as read from YAML) and type it; raises ZooError naming the field."""
        if not isinstance(d, dict):
            raise ZooError(f"{file}: models.{key}: an entry is a mapping of fields, got {type(d).__name__}")
        parse(ModelEntrySchema, d, str(file), ZooError, at=f"models.{key}")
        if d.get("key", key) != key:
            raise ZooError(f"{file}: models.{key}.key: must be the entry's own name {key!r}, got {d['key']!r}")
        return cls(**{**{k: v for k, v in d.items() if k != "key"}, "key": key,
                      "source": d.get("source") or {}, "accuracy": d.get("accuracy") or {},
                      "backends": d.get("backends") or {}})


__all__ = ["ModelEntry", "PREDICTED", "STATUSES"]
