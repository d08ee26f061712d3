"""The pair sweep: every threshold of one saver tried at once.

Sorting a saver's confidences once (descending) turns every threshold into a prefix of that
order, so the harm and repair counts of all thresholds are two cumulative sums, O(n log n) per
saver. `SaverOrder` is reused for every base (and by the ESN's exit policies);
`best_exit` returns the cheapest policy a criterion of `tinysaver.criteria` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .criteria import get_criterion
from .policy import Stage, midpoint_thresholds, per_sample_cost, stage_costs
from .splits import SplitData


@dataclass
class SaverOrder:
    """One saver's confidences sorted once (descending), reused for every base.

    ``valid[k]`` says whether exiting exactly the first ``k`` samples is reachable by a threshold
    (k = 0..n; a run of tied confidences is never split); ``cum_correct[k]`` counts the saver's
    correct answers among the first k.
    """

    order: np.ndarray
    sorted_conf: np.ndarray
    valid: np.ndarray
    cum_correct: np.ndarray

    @classmethod
    def build(cls, conf: np.ndarray, correct: np.ndarray) -> "SaverOrder":
        conf = np.asarray(conf, dtype=np.float64)
        n = len(conf)
        order = np.argsort(-conf, kind="stable")
        sc = conf[order]
        valid = np.ones(n + 1, dtype=bool)
        if n > 1:
            valid[1:n] = sc[:-1] > sc[1:]
        cum = np.concatenate([[0], np.cumsum(np.asarray(correct, dtype=np.int64)[order])])
        return cls(order, sc, valid, cum)

    @property
    def n(self) -> int:
        return len(self.order)

    def thresholds(self, ks: np.ndarray) -> np.ndarray:
        """The midpoint thresholds that exit exactly the first ``k``, for each k of ``ks``."""
        return midpoint_thresholds(self.sorted_conf, ks)

    def exits_at(self, thresholds: np.ndarray, strict: bool = False) -> np.ndarray:
        """How many samples have confidence ≥ t (or > t with ``strict``), for each t."""
        side = "left" if strict else "right"
        return np.searchsorted(-self.sorted_conf, -np.asarray(thresholds, dtype=np.float64), side=side)


def criterion_passes(criterion: str, outcomes, count: int, n: int, tolerance: float = 0.0, delta: float = 0.1,
                     method: str = "clopper-pearson") -> np.ndarray:
    """Which candidate policies meet ``criterion``: the one definition, for pairs and chains.

    Candidates are in testing order, fewest exits first; candidate 0 is "nothing exits".
    ``outcomes(rows)`` returns, for those candidate indices, ``(harm, repair, losses)``: counts
    over the ``n`` calibration samples, and a callable giving the (len(rows), n) per-sample losses
    (used by the ``wsr`` test only). ``delta`` is the level of this one sequence. Sequential rules
    (subset, guaranteed) pull candidates in chunks and stop at their first failure.
    Returns a (count,) mask; the caller takes the cheapest passing candidate. The rules themselves
    are registered in `tinysaver.criteria`.
    """
    return get_criterion(criterion).passes(outcomes, count, n, tolerance, delta, method)


def pair_candidates(so: SaverOrder, criterion: str) -> tuple[np.ndarray, np.ndarray]:
    """The candidate exit counts ``k`` (increasing, starting at 0) and their thresholds for one saver."""
    return get_criterion(criterion).candidates(so)


def best_exit(so: SaverOrder, base_correct: np.ndarray, criterion: str, tolerance: float = 0.0,
              delta: float = 0.1, method: str = "clopper-pearson") -> tuple[int, float]:
    """The cheapest passing policy of one saver → base pair: (exit count k, threshold)."""
    ks, ts = pair_candidates(so, criterion)
    bc = np.asarray(base_correct, dtype=bool)[so.order]
    sc = np.diff(so.cum_correct).astype(bool)
    harm_cum = np.concatenate([[0], np.cumsum(bc & ~sc)])
    repair_cum = np.concatenate([[0], np.cumsum(sc & ~bc)])

    d = bc.astype(np.int8) - sc.astype(np.int8)

    def outcomes(rows):
        k = ks[rows]
        return harm_cum[k], repair_cum[k], lambda: np.where(np.arange(so.n)[None, :] < k[:, None], d[None, :], 0)

    ok = criterion_passes(criterion, outcomes, len(ks), so.n, tolerance, delta, method)
    j = int(np.flatnonzero(ok)[-1])  # more exits never cost more
    return int(ks[j]), float(ts[j])


@dataclass
class Candidate:
    """A policy and what it does on the calibration split."""

    stages: list[Stage]
    cost: float      # mean cost per image on the calibration split
    correct: int     # calibration samples the cascade gets right


def candidate(stages: list[Stage], sd: SplitData, target: np.ndarray, costs: dict[str, float]) -> Candidate:
    ans, where = sd.outcome(stages, target)
    cost = float(per_sample_cost(where, stage_costs([costs[s.model] for s in stages])).mean())
    return Candidate(stages, cost, int((ans == target).sum()))


__all__ = ["SaverOrder", "criterion_passes", "pair_candidates", "best_exit", "Candidate", "candidate"]
