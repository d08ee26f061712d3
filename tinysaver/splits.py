"""Per-model predictions on one evaluation split, aligned sample by sample, and the choice of the
selector's calibration and held-out splits.

Everything downstream of the zoo reads predictions as a `SplitData`: labels ``(n,)``, and
per model its top-1 class ``(n,)`` and max-softmax confidence ``(n,)`` in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .policy import SelectionError, Stage, answers, apply
from .zoo import Zoo

CALIBRATIONS = (None, "temperature")  # how confidences may be recalibrated before thresholds are chosen


def check_calibration(calibrate: str | None) -> None:
    """The one check of a ``calibrate`` option (selector, zoo reads and the exit-method comparison)."""
    if calibrate not in CALIBRATIONS:
        raise SelectionError(f"calibrate must be one of {', '.join(map(str, CALIBRATIONS))}, got {calibrate!r}")


@dataclass
class SplitData:
    """Per-model predictions on one evaluation set, aligned sample by sample."""

    name: str
    labels: np.ndarray
    pred: dict[str, np.ndarray]
    conf: dict[str, np.ndarray]
    temperature: dict[str, float] = field(default_factory=dict)  # models whose ``conf`` is temperature-scaled

    def outcome(self, stages: Sequence[Stage], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answer, answering stage) of a policy on this split."""
        thresholds = [s.threshold for s in stages[:-1]]
        where = apply([self.conf[s.model] for s in stages], thresholds)  # the base's row is not read
        return answers([self.pred[s.model] for s in stages], where), where

    def targets(self, base: str, label_free: bool) -> np.ndarray:
        """What a policy is scored against: the labels, or with ``label_free`` the base's answers."""
        return self.pred[base] if label_free else self.labels

    def subset(self, idx: np.ndarray, name: str) -> "SplitData":
        """The samples ``idx`` (in that order) as a split of their own."""
        return SplitData(name, self.labels[idx], {m: v[idx] for m, v in self.pred.items()},
                         {m: v[idx] for m, v in self.conf.items()}, self.temperature)


def load_split_data(zoo: Zoo, split: str, models: Sequence[str], calibrate: str | None = None) -> SplitData:
    """Stored predictions; with ``calibrate='temperature'``, the confidences of ``tinysaver zoo calibrate``."""
    check_calibration(calibrate)
    read = zoo.calibrated_predictions if calibrate else zoo.predictions
    preds = {m: read(m, split) for m in models}
    labels = next(iter(preds.values())).labels
    temps = {m: zoo.temperature(m) for m in models} if calibrate else {}
    return SplitData(split, labels, {m: p.pred for m, p in preds.items()}, {m: p.conf for m, p in preds.items()},
                     temps)


def calibration_and_test(zoo: Zoo, models: Sequence[str], calib_split: str | None, test_split: str | None,
                         seed: int = 0, calibrate: str | None = None) -> tuple[SplitData, SplitData | None]:
    """Pick the selection split and the held-out split.

    Defaults: ``calib``/``test`` when the zoo has both; otherwise the zoo's first split cut into two
    seeded halves named ``<split>[calib]`` and ``<split>[holdout]``.
    """
    splits = list(zoo.splits)
    if calib_split is None and test_split is None:
        if "calib" in splits and "test" in splits:
            calib_split, test_split = "calib", "test"
        elif splits:
            whole = load_split_data(zoo, splits[0], models, calibrate)
            calib_idx, held_idx = _halves(len(whole.labels), seed)
            return (whole.subset(calib_idx, f"{splits[0]}[calib]"), whole.subset(held_idx, f"{splits[0]}[holdout]"))
        else:
            raise SelectionError(f"zoo {zoo.name!r} has no splits with predictions")
    if calib_split is None:
        raise SelectionError("give the calibration split too")
    if test_split == calib_split:
        raise SelectionError("the held-out split must differ from the calibration split")
    calib = load_split_data(zoo, calib_split, models, calibrate)
    test = load_split_data(zoo, test_split, models, calibrate) if test_split else None
    return calib, test


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n // 2]), np.sort(perm[n // 2:])


def held_out(zoo: Zoo, seed: int = 0) -> tuple[str, np.ndarray]:
    """The held-out samples of `calibration_and_test`'s defaults, as (split, indices into it): the
    images a run may be scored on that no selection or gear plan of this zoo was fitted to."""
    splits = list(zoo.splits)
    if "calib" in splits and "test" in splits:
        return "test", np.arange(zoo.splits["test"]["samples"])
    if not splits:
        raise SelectionError(f"zoo {zoo.name!r} has no splits with predictions")
    return splits[0], _halves(int(zoo.splits[splits[0]]["samples"]), seed)[1]


__all__ = ["CALIBRATIONS", "check_calibration", "SplitData", "load_split_data", "calibration_and_test", "held_out"]
