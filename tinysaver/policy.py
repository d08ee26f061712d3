"""The cascade policy, written once: stages, thresholds, which stage answers, what it costs.

A policy is a list of stages in running order. Every stage but the last has a confidence
threshold; a sample is answered by the first stage whose max-softmax confidence is ≥ its
threshold, and the last stage (the base) answers whatever reaches it. `apply` is the only
implementation of that rule in the project: the selector, the cascade, the ESN policy, the
evaluations and the plots all call it.

Pure numpy: no models, no files.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .criteria import DEFAULT_CRITERION, criterion_names, get_criterion
from .errors import SelectionError  # noqa: F401 (re-exported)
from .schemas import SelectionSchema, load_json, parse

SCHEMA_VERSION = 1
GEARS_SCHEMA_VERSION = 2  # version 1 with a gear plan (tinysaver.gears)
MAX_SELECTION_BYTES = 2**20
CRITERIA = criterion_names()  # registered in tinysaver.criteria
TARGETS = ("labels", "base-agreement")
# a calibration sample this close to a threshold could flip sides under float noise (other kernels,
# other batch sizes); selections report how many there are
MARGIN = 1e-5



# --- the rule ------------------------------------------------------------------------------------------

def confident(conf, threshold: float):
    """The exit test: a stage answers where its confidence reaches its threshold (``conf ≥ t``),
    compared in float64 so that a threshold strictly between two float32 confidences separates
    them exactly. ``conf``: a number or an (N,) array; returns a bool or an (N,) mask."""
    out = np.asarray(conf, dtype=np.float64) >= float(threshold)
    return bool(out) if out.ndim == 0 else out


def apply(confs: np.ndarray | Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """Index of the answering stage for each sample.

    ``confs``: (S', N) max-softmax confidences of the stages in running order, S' ≥ len(thresholds)
    (rows past the thresholds, such as the base's own confidence, are ignored).
    ``thresholds``: one per stage that may exit early; ``inf`` disables a stage.
    Returns (N,) int64 in [0, len(thresholds)]; len(thresholds) means "the last stage".
    Comparisons run in float64, so a threshold strictly between two float32 confidences
    separates them exactly.
    """
    thresholds = list(thresholds)
    if len(thresholds) == 0:
        n = len(confs[0]) if len(confs) else 0
        return np.zeros(n, dtype=np.int64)
    if len(confs) < len(thresholds):
        raise SelectionError(f"{len(thresholds)} thresholds need confidences of as many stages, got {len(confs)}")
    n = len(confs[0])
    stage = np.full(n, len(thresholds), dtype=np.int64)
    for i in range(len(thresholds) - 1, -1, -1):  # backwards, so the first confident stage wins
        stage[confident(confs[i], thresholds[i])] = i
    return stage


def exits(conf: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) mask of the samples one stage answers: `apply` with that stage alone."""
    return apply([conf], [threshold]) == 0


def confidence(logits, temperature: float = 1.0):
    """The one confidence formula: ``max softmax(logits / T)`` over classes, and its class.

    ``logits``: (B, K) torch tensor (or array), any float dtype and device; it is computed in
    float32 on that device. ``temperature`` T > 0 (1: uncalibrated). Returns ``(conf, pred)``, two
    (B,) torch tensors: float32 confidences in [0, 1] and int64 classes. Every stage, the profiler,
    the runtimes' agreement check, the service and the exit methods compute it here, so an exit
    decision online is the one the selector made offline.
    """
    if not hasattr(logits, "softmax"):  # numpy: torch is imported only when an array comes in
        import torch

        logits = torch.as_tensor(logits)
    x = logits.float()
    if temperature != 1.0:  # dividing by 1 changes no bit, but costs a pass over the logits
        x = x / temperature
    return x.softmax(-1).max(-1)


def answers(preds: np.ndarray | Sequence[np.ndarray], stage: np.ndarray) -> np.ndarray:
    """(N,) prediction of the answering stage, from (S, N) per-stage predictions."""
    preds = np.asarray(preds)
    return preds[stage, np.arange(preds.shape[1])]


def exit_ratios(stage: np.ndarray, num_stages: int) -> list[float]:
    """Fraction of samples answered by each stage (sums to 1)."""
    n = max(len(stage), 1)
    return [float(c) / n for c in np.bincount(stage, minlength=num_stages)[:num_stages]]


def stage_costs(costs: Sequence[float]) -> np.ndarray:
    """Cost of a sample answered at stage i: every stage up to i ran (cumulative sum)."""
    return np.cumsum(np.asarray(costs, dtype=np.float64))


def per_sample_cost(stage: np.ndarray, cumulative_costs: Sequence[float]) -> np.ndarray:
    """(N,) cost of each sample, given the cost of answering at each stage (see `stage_costs`)."""
    return np.asarray(cumulative_costs, dtype=np.float64)[stage]


def near_threshold(confs: np.ndarray | Sequence[np.ndarray], thresholds: Sequence[float],
                   margin: float = MARGIN) -> list[int]:
    """How many samples lie within ``margin`` of each threshold (they could flip under float noise)."""
    return [int((np.abs(np.asarray(confs[i], dtype=np.float64) - t) < margin).sum()) if math.isfinite(t) else 0
            for i, t in enumerate(thresholds)]


def midpoint_thresholds(sorted_desc: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """For each exit count k, the threshold that exits exactly the first k of ``sorted_desc``
    (descending confidences), halfway between the k-th and (k+1)-th, so no sample sits on it.

    k = 0 gives ``inf`` (nothing exits); k = N gives half the lowest confidence (everything exits).
    A k that would split a run of tied confidences is refused.
    """
    sc = np.asarray(sorted_desc, dtype=np.float64)
    ks = np.asarray(ks, dtype=np.int64)
    n = len(sc)
    t = np.full(len(ks), np.inf)
    inner = (ks > 0) & (ks < n)
    hi, lo = sc[ks[inner] - 1], sc[ks[inner]]
    if np.any(hi <= lo):
        j = int(np.flatnonzero(hi <= lo)[0])
        raise SelectionError(f"cannot split tied confidences {hi[j]} and {lo[j]}")
    t[inner] = (hi + lo) / 2
    if n:
        t[ks >= n] = sc[n - 1] / 2
    return t


# --- the typed selection -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    model: str
    threshold: float | None  # None for the base, which answers everything that reaches it
    temperature: float = 1.0  # confidence = max softmax(logits / temperature); ≠ 1 after ``--calibrate temperature``


@dataclass
class Selection:
    """A cascade chosen for one base: its policy, how it was chosen, and what it achieved.

    This is the one object that crosses from the selector to the cascade, the CLI and JSON files.
    Costs are in the unit of ``cost_metric`` per image (FLOPs, or ms for latency). Accuracies are
    fractions in [0, 1]; with ``target == 'base-agreement'`` they are agreement with the base.
    ``near_threshold_calib[i]`` counts calibration samples within 1e-5 of saver i's threshold.
    """

    zoo: str
    base: str
    stages: list[Stage]
    criterion: str = DEFAULT_CRITERION
    tolerance: float = 0.0
    delta: float | None = None
    cost_metric: str = "flops"
    target: str = "labels"
    calib_split: str | None = None
    test_split: str | None = None
    cost_base: float | None = None
    cost_cascade: float | None = None
    exit_ratio_calib: list[float] = field(default_factory=list)
    acc_base_calib: float | None = None
    acc_cascade_calib: float | None = None
    exit_ratio_test: list[float] | None = None
    acc_base_test: float | None = None
    acc_cascade_test: float | None = None
    near_threshold_calib: list[int] = field(default_factory=list)
    calib_samples: int | None = None
    # zero/bounded: the one-sided Clopper–Pearson bound (points, δ = 0.1) on the loss against the
    # base that the chosen policy carries on calib_samples, read as if it had been fixed in advance
    cp_bound_points: float | None = None
    guarantee: str = ""
    message: str = ""
    schema_version: int = SCHEMA_VERSION
    gears: dict | None = None  # a gear plan (tinysaver.gears.GearPlan.to_dict), in schema version 2 only

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else _stage_from(s) for s in self.stages]
        validate_stages(self.stages, self.base)
        get_criterion(self.criterion)  # raises, naming the registered ones
        if self.target not in TARGETS:
            raise SelectionError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.schema_version not in (SCHEMA_VERSION, GEARS_SCHEMA_VERSION):
            raise SelectionError(f"selection schema version {self.schema_version} is not supported "
                                 f"(this tinysaver reads versions {SCHEMA_VERSION} and {GEARS_SCHEMA_VERSION}); "
                                 "re-run 'tinysaver query --save'")
        if (self.gears is not None) != (self.schema_version == GEARS_SCHEMA_VERSION):
            raise SelectionError(f"a selection with gears has schema version {GEARS_SCHEMA_VERSION}, one without "
                                 f"has {SCHEMA_VERSION}; got version {self.schema_version} "
                                 f"{'with' if self.gears is not None else 'without'} gears")
        if self.gears is not None and [self.gears.get("saver"), self.gears.get("base")] != self.models:
            raise SelectionError(f"the gears are for {self.gears.get('saver')} → {self.gears.get('base')}, the "
                                 f"selection is {' → '.join(self.models)}")

    # -- the policy
    @property
    def models(self) -> list[str]:
        return [s.model for s in self.stages]

    @property
    def thresholds(self) -> list[float]:
        return [float(s.threshold) for s in self.stages[:-1]]

    @property
    def temperatures(self) -> list[float]:
        """One per stage, in running order; all 1.0 unless selected on temperature-scaled confidences."""
        return [float(s.temperature) for s in self.stages]

    @property
    def found(self) -> bool:
        return len(self.stages) > 1

    @property
    def savers(self) -> list[Stage]:
        return self.stages[:-1]

    @property
    def saving_pct(self) -> float | None:
        if self.cost_base is None or self.cost_cascade is None:
            return None
        return 100.0 * (1 - self.cost_cascade / self.cost_base)

    @classmethod
    def coerce(cls, obj: Any, caller: str = "this") -> "Selection":
        """A Selection from a Selection, its dict form or a JSON file path; anything else is refused."""
        if isinstance(obj, (str, os.PathLike)):
            return cls.load(obj)
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        if not isinstance(obj, cls):
            raise SelectionError(f"{caller} takes a Selection, its dict or a JSON path, got {type(obj).__name__}")
        return obj

    @classmethod
    def manual(cls, zoo: str, savers: Sequence[tuple[str, float]], base: str) -> "Selection":
        """A policy given by hand (no selection report), e.g. ``tinysaver infer --saver S --threshold t``."""
        return cls(zoo=zoo, base=base, stages=[Stage(m, t) for m, t in savers] + [Stage(base, None)],
                   message="given by hand")

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [{"model": s.model, "threshold": s.threshold,
                        **({"temperature": s.temperature} if s.temperature != 1.0 else {})} for s in self.stages]
        if d["gears"] is None:  # a version-1 file, as every tinysaver before gears reads it
            del d["gears"]
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "selection") -> "Selection":
        if not isinstance(d, dict):
            raise SelectionError(f"{source}: a selection is a JSON object, got {type(d).__name__}")
        if "schema_version" not in d:
            raise SelectionError(f"{source}: no schema_version; re-create it with 'tinysaver query --save'")
        parse(SelectionSchema, d, source, SelectionError)
        try:
            return cls(**d)
        except SelectionError as e:
            raise SelectionError(f"{source}: {e}") from None
        except TypeError as e:
            raise SelectionError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        from .zoo import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Selection":
        path = Path(path)
        if path.is_dir():
            raise SelectionError(f"{path}: a folder, not a selection file (write one with 'tinysaver query --save')")
        if not path.is_file():
            raise SelectionError(f"{path}: no such selection file")
        if path.stat().st_size > MAX_SELECTION_BYTES:  # a selection is a few hundred bytes: never read a huge one
            raise SelectionError(f"{path}: {path.stat().st_size:,} bytes is not a selection file (they are under "
                                 f"{MAX_SELECTION_BYTES // 2**20} MB); write one with 'tinysaver query --save'")
        try:
            text = path.read_bytes()
        except OSError as e:
            raise SelectionError(f"{path}: cannot be read ({(e.strerror or str(e)).lower()})") from None
        return cls.from_dict(load_json(text, str(path), SelectionError), source=str(path))


def _stage_from(d: Any) -> Stage:
    if not isinstance(d, dict) or not {"model", "threshold"} <= set(d) <= {"model", "threshold", "temperature"}:
        raise SelectionError(f"each stage is {{'model': NAME, 'threshold': T or null[, 'temperature': T > 0]}}, got {d!r}")
    return Stage(d["model"], d["threshold"], d.get("temperature", 1.0))


def validate_stages(stages: Sequence[Stage], base: str | None = None) -> None:
    """One place for what makes a policy valid: named models, distinct, thresholds in [0, 1] except
    the last stage's, which is None."""
    if not stages:
        raise SelectionError("a policy needs at least the base stage")
    names = [s.model for s in stages]
    for m in names:
        if not isinstance(m, str) or not m:
            raise SelectionError(f"stage models must be non-empty names, got {m!r}")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise SelectionError(f"a model cannot be its own saver: {', '.join(dup)} appears twice in the cascade")
    if base is not None and names[-1] != base:
        raise SelectionError(f"the last stage must be the base {base!r}, got {names[-1]!r}")
    if stages[-1].threshold is not None:
        raise SelectionError(f"the base {names[-1]!r} answers everything that reaches it: its threshold must be null")
    for s in stages:
        t = s.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (np.isfinite(t) and t > 0):
            raise SelectionError(f"stage {s.model!r}: a temperature is a number > 0, got {t!r}")
    for s in stages[:-1]:
        t = s.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= float(t) <= 1.0):
            raise SelectionError(f"saver {s.model!r}: a threshold is a max-softmax confidence in [0, 1], got {t!r}")


__all__ = ["apply", "confident", "answers", "exit_ratios", "stage_costs", "per_sample_cost", "near_threshold",
           "midpoint_thresholds", "exits", "Stage", "Selection", "SelectionError", "validate_stages", "CRITERIA",
           "SCHEMA_VERSION", "MARGIN"]
