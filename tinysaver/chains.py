"""Chains S1 → S2 → base: two savers before the base, stages in increasing cost.

``zero``/``bounded`` are searched exactly (`chain_exact`): for every exit count of S1, the
best threshold of S2 over the samples S1 passes on comes from prefix sums kept up to date as S1's
exits grow, O(n²) per chain. ``guaranteed`` tests fixed paths of threshold pairs
(`CHAIN_PATHS`), each path a test sequence of its own, so that δ can be split over them
before the data are seen.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .criteria import GUARANTEE_GRID, get_criterion
from .policy import Stage, apply, per_sample_cost, stage_costs
from .splits import SplitData
from .sweep import Candidate, SaverOrder, candidate, criterion_passes

# guaranteed chains: paths (1 − t1) = r · (1 − t2), t2 walking down GUARANTEE_GRID
CHAIN_PATHS = (1.0, 0.5, 0.25)
MAX_STAGES = 3


def chain_sequences(pool_size: int) -> int:
    """Guaranteed chains: one test sequence per pair of savers and threshold path."""
    return pool_size * (pool_size - 1) // 2 * len(CHAIN_PATHS)


def chain_exact(c1, c2, s1_ok, s2_ok, b_ok, cost1: float, cost2: float, cost_b: float, slack: float,
                 beat: float) -> tuple[float, float, float] | None:
    """Cheapest S1 → S2 → B policy with correct(cascade) − correct(base) ≥ −slack, if it costs < ``beat``
    (total over the split). Returns (total cost, t1, t2): S1 exits its first k1 samples, and S2 exits,
    among the rest, those in the first m2 of its own order."""
    n = len(c1)
    o1 = SaverOrder.build(c1, s1_ok)
    o2 = SaverOrder.build(c2, s2_ok)
    pos2 = np.empty(n, dtype=np.int64)
    pos2[o2.order] = np.arange(n)
    g1 = s1_ok.astype(np.int64) - b_ok
    g2 = s2_ok.astype(np.int64) - b_ok
    # start with S1 exiting everything, then hand samples back to the rest in S1's order (k1 falling)
    gain1 = int(g1.sum())
    prefix2 = np.zeros(n + 1, dtype=np.int64)   # S2's gain over the first m of its order, rest only
    in_rest = np.zeros(n, dtype=bool)           # by S2 position
    best = None
    for k1 in range(n, -1, -1):
        if k1 < n:
            j = o1.order[k1]
            gain1 -= int(g1[j])
            p = pos2[j]
            in_rest[p] = True
            if g2[j]:
                prefix2[p + 1:] += g2[j]
        lower = n * cost1 + (n - k1) * cost2  # even if S2 answered the whole rest
        if lower >= beat:
            break  # lower only grows as k1 falls
        if not o1.valid[k1] or k1 == 0:
            continue
        ok = o2.valid & (prefix2 >= -slack - gain1)
        m2 = n - int(np.argmax(ok[::-1]))  # the largest feasible m, if any is (checked next)
        if not ok[m2]:
            continue
        exits2 = int(in_rest[:m2].sum())
        if exits2 == 0:
            continue
        total = lower + (n - k1 - exits2) * cost_b
        if total < beat:
            beat, best = total, (total, k1, m2)
    if best is None:
        return None
    total, k1, m2 = best
    return total, float(o1.thresholds([k1])[0]), float(o2.thresholds([m2])[0])


def chain_candidates(base: str, pool: Sequence[str], calib: SplitData, costs: dict[str, float], *,
                     criterion: str, tolerance: float, method: str, label_free: bool, beat: float,
                     delta_seq: float) -> list[Candidate]:
    """Chains S1 → S2 → base (S1 cheaper than S2) that cost less than ``beat`` per image, each
    cheaper than the one before. ``delta_seq``: the level of each guaranteed path."""
    target = calib.targets(base, label_free)
    ok = {m: calib.pred[m] == target for m in (*pool, base)}
    n = len(target)
    out = []
    crit = get_criterion(criterion)
    for s1, s2 in itertools.combinations(sorted(pool, key=lambda m: costs[m]), 2):
        if crit.chains == "exact":
            slack = tolerance * n / 100 + 1e-9 if crit.takes_tolerance else 0
            found = chain_exact(calib.conf[s1], calib.conf[s2], ok[s1], ok[s2], ok[base].astype(np.int64),
                                 costs[s1], costs[s2], costs[base], slack, beat * n)
            if found is None:
                continue
            _, t1, t2 = found
            stages = [Stage(s1, t1), Stage(s2, t2), Stage(base, None)]
        else:  # "paths": fixed paths of threshold pairs, each a test sequence
            stages = chain_guaranteed(s1, s2, base, calib, ok, costs, criterion=criterion, tolerance=tolerance,
                                      method=method, delta_seq=delta_seq)
            if stages is None:
                continue
        cand = candidate(stages, calib, target, costs)
        if cand.cost < beat:
            out.append(cand)
            beat = cand.cost
    return out


def chain_guaranteed(s1: str, s2: str, base: str, calib: SplitData, ok: dict[str, np.ndarray],
                     costs: dict[str, float], *, criterion: str, tolerance: float, method: str,
                     delta_seq: float) -> list[Stage] | None:
    """The cheapest policy of S1 → S2 → base that passes along one of `CHAIN_PATHS`;
    ``ok[m]`` says where model m is right (n,)."""
    n = len(calib.labels)
    b_ok = ok[base].astype(np.int8)
    correct = np.stack([ok[s1], ok[s2], ok[base]]).astype(np.int8)
    cum = stage_costs([costs[s1], costs[s2], costs[base]])
    best = None
    t2 = np.concatenate([[np.inf], GUARANTEE_GRID])
    rows_n = np.arange(n)[None, :]
    for r in CHAIN_PATHS:
        t1 = np.where(np.isinf(t2), np.inf, 1 - r * (1 - t2))
        seen = {}

        def outcomes(rows):
            where = np.stack([apply([calib.conf[s1], calib.conf[s2]], [t1[j], t2[j]]) for j in rows])
            loss = b_ok[None, :] - correct[where, rows_n]
            seen.update(zip(rows.tolist(), where))
            return (loss == 1).sum(1), (loss == -1).sum(1), lambda: loss

        passing = criterion_passes(criterion, outcomes, len(t2), n, tolerance, delta_seq, method)
        for j in np.flatnonzero(passing)[1:]:
            c = float(per_sample_cost(seen[int(j)], cum).mean())
            if best is None or c < best[0]:
                best = (c, [Stage(s1, float(t1[j])), Stage(s2, float(t2[j])), Stage(base, None)])
    return None if best is None else best[1]


__all__ = ["CHAIN_PATHS", "MAX_STAGES", "chain_sequences", "chain_exact", "chain_candidates",
           "chain_guaranteed"]
