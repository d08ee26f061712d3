"""The selection criteria, each registered once: which candidate policies of a saver meet it.

A criterion supplies two things to the selector (`tinysaver.selector`):

- ``candidates(order)``: the exit counts ``k`` (increasing, from 0) and thresholds a saver's
  sorted confidences are tried at (``order`` is a `SaverOrder`);
- ``passes(outcomes, count, n, tolerance, delta, method)``: a (count,) mask of the candidates that
  meet it, from their harm/repair counts over ``n`` calibration samples (tolerance in accuracy
  points; ``delta`` the level of this one test sequence). Candidate 0 ("nothing exits") passes.

and says how chains are searched (``chains``: ``"exact"`` sweep, fixed threshold ``"paths"``, or
``None`` for no chain form), whether it takes a tolerance, and whether it is a statistical
guarantee that spends δ. Adding a criterion is one ``register_criterion`` call here; the names
are read by the command line and by `Selection` from this registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SelectionError
from .registry import Registry
from .risk import METHODS, fixed_sequence, passes_clopper_pearson, passes_wsr

# the paper's public code scans these thresholds (np.arange keeps its float steps exactly)
CP_REPORT_DELTA = 0.1     # zero/bounded report the Clopper–Pearson bound their policy carries at this δ
SMALL_CALIBRATION = 1000  # below this many calibration samples, zero/bounded warn and point to guaranteed
PUBLIC_GRID = np.arange(1, 0, -0.001)
# guaranteed: a data-independent grid, fine near 1 where confident savers pile up; descending
GUARANTEE_GRID = np.unique(np.concatenate([np.round(np.arange(1, 1000) / 1000, 3),
                                           1 - 10.0 ** -np.arange(3.02, 7.001, 0.02)]))[::-1]


@dataclass(frozen=True)
class Criterion:
    name: str
    candidates: Callable
    passes: Callable
    chains: str | None          # "exact", "paths" or None
    takes_tolerance: bool
    guarantee: bool             # a (1 − δ) statement about new samples; spends δ
    help: str = ""


DEFAULT_CRITERION = "zero"  # no accuracy lost against the target on the calibration split
CRITERION_REGISTRY: Registry[Criterion] = Registry("criterion", SelectionError)


def register_criterion(c: Criterion) -> Criterion:
    return CRITERION_REGISTRY.add(c.name, c)


criterion_names, get_criterion = CRITERION_REGISTRY.names, CRITERION_REGISTRY.get


def _every_exit_count(order) -> tuple[np.ndarray, np.ndarray]:
    ks = np.flatnonzero(order.valid)
    return ks, order.thresholds(ks)


def _gain_test(zero: bool):
    """zero: repair − harm ≥ 0; bounded: repair − harm ≥ −ε·n/100 (every candidate at once)."""
    def passes(outcomes, count, n, tolerance=0.0, delta=0.1, method=None):
        ok = np.zeros(count, dtype=bool)
        ok[0] = True
        harm, repair, _ = outcomes(np.arange(count))
        gain = np.asarray(repair, dtype=np.int64) - np.asarray(harm, dtype=np.int64)
        ok |= (gain >= 0) if zero else (100 * gain >= -tolerance * n - 1e-9)
        return ok
    return passes


def _sequential(test):
    """Pull candidates in chunks of 64, in testing order, and stop at the first failure.

    ``test(harm, repair, losses, n, tolerance, delta, method)`` gives (passed, ok-mask of the chunk)."""
    def passes(outcomes, count, n, tolerance=0.0, delta=0.1, method="clopper-pearson"):
        ok = np.zeros(count, dtype=bool)
        ok[0] = True
        for start in range(1, count, 64):
            rows = np.arange(start, min(start + 64, count))
            passed, mask = test(*outcomes(rows), n, tolerance, delta, method)
            ok[rows] = mask
            if not passed.all():
                break
        return ok
    return passes


def _first_dip(harm, repair, losses, n, tolerance, delta, method):
    passed = np.asarray(repair) >= np.asarray(harm)
    fail = np.flatnonzero(~passed)
    mask = np.zeros(len(passed), dtype=bool)
    mask[: fail[0] + 1 if len(fail) else len(passed)] = True  # the first dip is itself the answer
    return passed, mask


def _risk_test(harm, repair, losses, n, tolerance, delta, method):
    if method == "clopper-pearson":
        passed = passes_clopper_pearson(harm, repair, n, tolerance / 100.0, delta)
    else:
        passed = passes_wsr(losses(), tolerance / 100.0, delta)
    return passed, fixed_sequence(passed)


def _guaranteed(outcomes, count, n, tolerance=0.0, delta=0.1, method="clopper-pearson"):
    if method not in METHODS:
        raise SelectionError(f"guarantee method must be one of {', '.join(METHODS)}, got {method!r}")
    return _sequential(_risk_test)(outcomes, count, n, tolerance, delta, method)


def _public_grid(order):
    ks = np.concatenate([[0], order.exits_at(PUBLIC_GRID, strict=True)])
    return ks, order.thresholds(ks)


def _guarantee_grid(order):
    return np.concatenate([[0], order.exits_at(GUARANTEE_GRID)]), np.concatenate([[np.inf], GUARANTEE_GRID])


register_criterion(Criterion("zero", _every_exit_count, _gain_test(zero=True), "exact", False, False,
                             "the cascade is at least as accurate as the base on the calibration split"))
register_criterion(Criterion("bounded", _every_exit_count, _gain_test(zero=False), "exact", True, False,
                             "at most ε points less accurate than the base on the calibration split"))
register_criterion(Criterion("subset", _public_grid, _sequential(_first_dip), None, False, False,
                             "the paper's public-code rule: scan 1, 0.999, … down to the first dip"))
register_criterion(Criterion("guaranteed", _guarantee_grid, _guaranteed, "paths", True, True,
                             "P(expected loss on new samples > ε) ≤ δ, by tests in fixed sequence"))

__all__ = ["DEFAULT_CRITERION", "Criterion", "register_criterion", "criterion_names", "get_criterion", "PUBLIC_GRID",
           "GUARANTEE_GRID"]
