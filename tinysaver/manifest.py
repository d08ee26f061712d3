"""The typed entry of one model in a zoo manifest (``zoo.yaml``), checked when the zoo loads.

Like timm's ``PretrainedCfg``, a `ModelEntry` is the one typed description of a model that
travels with it: what it is, how it was built, what it costs and how accurate it was. The manifest
stays plain YAML that the profiler writes and people may edit by hand, so every entry is checked
on load (types, ranges and names) and a bad one is refused with the file, the model and the
field named. Units: ``params`` in parameters, ``flops``/``macs`` per image, latency
``ms_per_batch`` in milliseconds, ``accuracy`` as a fraction in [0, 1] per split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .backends import BACKENDS
from .errors import ZooError
from .schemas import PreprocessSchema, parse

# profiled here, predictions made elsewhere (tinysaver zoo import), or facts copied from a published table
STATUSES = ("measured", "imported", "published")
PREDICTED = ("measured", "imported")  # the statuses whose entries hold per-sample predictions


def _kind(v: Any) -> str:
    return f"the text {v!r}" if isinstance(v, str) else f"{v!r} (a {type(v).__name__})"


class _Check:
    """Raises one ZooError naming the file, the model and the field."""

    def __init__(self, file: Path | str, model: str):
        self.where = f"{file}: model {model!r}"

    def fail(self, name: str, what: str, v: Any):
        hint = ""
        if isinstance(v, str) and v.strip().lstrip("+-").replace(".", "", 1).replace("e", "", 1).isdigit():
            hint = " (YAML reads 1.5e6 as text: write 1.5e+6 or 1500000)"
        raise ZooError(f"{self.where}: field {name!r} must be {what}, got {_kind(v)}{hint}")

    def number(self, name: str, v: Any, *, low: float = 0.0, high: float = math.inf, strict: bool = True,
               integer: bool = False) -> float | int | None:
        if v is None:
            return None
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        what = ("an integer" if integer else "a number") + (f" > {low:g}" if strict else f" ≥ {low:g}") \
            + (f" and ≤ {high:g}" if high < math.inf else "")
        if isinstance(v, bool) or not ok_type or not math.isfinite(v):
            self.fail(name, what, v)
        if (v <= low if strict else v < low) or v > high:
            self.fail(name, what, v)
        return v

    def mapping(self, name: str, v: Any) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(name, "a mapping", v)
        return v

    def latency(self, name: str, v: Any) -> dict | None:
        if v is None:
            return None
        v = self.mapping(name, v)
        for bs, row in self.mapping(f"{name}.table", v.get("table")).items():
            if not (isinstance(bs, str) and bs.startswith("bs") and bs[2:].isdigit() and int(bs[2:]) >= 1):
                self.fail(f"{name}.table", "keyed by batch size (bs1, bs32, …)", bs)
            row = self.mapping(f"{name}.table.{bs}", row)
            self.number(f"{name}.table.{bs}.ms_per_batch", row.get("ms_per_batch"))
        return v


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
        c = _Check(file, key)
        if not isinstance(d, dict):
            raise ZooError(f"{c.where}: an entry is a mapping of fields, got {_kind(d)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, d)) - known)
        if unknown:
            raise ZooError(f"{c.where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(sorted(known))}")
        if d.get("key", key) != key:
            c.fail("key", f"the entry's own name {key!r}", d.get("key"))
        if d.get("status") not in STATUSES:
            c.fail("status", " or ".join(map(repr, STATUSES)), d.get("status"))
        c.number("num_classes", d.get("num_classes"), low=2, strict=False, integer=True)
        c.number("params", d.get("params"), integer=True)
        for name in ("flops", "macs"):
            c.number(name, d.get(name))
        for split, acc in c.mapping("accuracy", d.get("accuracy")).items():
            c.number(f"accuracy.{split}", acc, high=1.0, strict=False)
        c.latency("latency", d.get("latency"))
        cal = c.mapping("calibration", d.get("calibration"))
        if cal:
            c.number("calibration.temperature", cal.get("temperature"))
        for name, b in c.mapping("backends", d.get("backends")).items():
            if name not in BACKENDS:
                c.fail("backends", f"keyed by backend ({', '.join(BACKENDS)})", name)
            c.latency(f"backends.{name}.latency", c.mapping(f"backends.{name}", b).get("latency"))
        for name in ("source", "preprocess", "published", "imported", "trained"):
            c.mapping(name, d.get(name))
        for name in ("flops_counter", "profiled_on"):
            if d.get(name) is not None and not isinstance(d[name], str):
                c.fail(name, "a name", d[name])
        if d.get("preprocess"):  # what every image for this model is made into: declared, not checked by hand
            parse(PreprocessSchema, d["preprocess"], str(file), ZooError, at=f"models.{key}.preprocess")
        return cls(**{**{k: v for k, v in d.items() if k != "key"}, "key": key,
                      "source": d.get("source") or {}, "accuracy": d.get("accuracy") or {},
                      "backends": d.get("backends") or {}})


__all__ = ["ModelEntry", "PREDICTED", "STATUSES"]
