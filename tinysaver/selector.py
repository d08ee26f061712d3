"""Choose, for a base model, the saver model(s) and confidence threshold(s) of least expected cost.

A cascade runs the saver S first; a sample exits when S's max-softmax confidence is ≥ t, and the
rest go to the base B (the rule itself is :func:`tinysaver.policy.apply`). With ``k`` samples
exiting out of ``n``, the relative cost is ``cost(S)/cost(B) + (1 − k/n)``.

Every policy is scored by two counts over the calibration samples: *harm* (the base was right, the
cascade is wrong) and *repair* (the reverse). One function, :func:`criterion_passes`, turns those
counts into "meets the criterion" for pairs and chains alike (tolerance ε in accuracy points):

- ``zero``: repair − harm ≥ 0, i.e. the cascade is at least as accurate as the base;
- ``bounded``: repair − harm ≥ −ε·n/100;
- ``subset``: the rule of the paper's public code. Thresholds 1, 0.999, … 0.001 are scanned
  downward; exits are the samples with confidence > t; the answer is the first t where the saver
  is less accurate than the base on the exited samples (or 0.001 if there is none). Pairs only;
- ``guaranteed``: with probability ≥ 1 − δ over the calibration draw, the expected loss on new
  samples from the same distribution is ≤ ε. Policies are tested with :mod:`tinysaver.risk` along
  sequences fixed before the data are seen (a threshold grid, and for chains fixed paths of
  threshold pairs); δ is split evenly over every sequence tested for the base (Bonferroni), so
  the choice among savers and chains is covered too. Assumption: exchangeable samples.

Pairs are searched exactly: sorting S's confidences once turns every threshold into a prefix of
that order. Chains (``max_stages=3``: S1 → S2 → B, stages in increasing cost) are searched
exactly for ``zero``/``bounded``: for every exit count of S1, the best threshold of S2 over the
samples S1 passes on is found from prefix sums kept up to date as S1's exits grow (O(n²) per
chain, see benchmarks/RESULTS.md for the time). A chain is reported only when it beats every pair.

Thresholds lie halfway between the two calibration confidences around them, never on a sample,
so float noise in a re-run cannot move a calibration sample across one.

Label-free mode replaces the labels with the base's own predictions (the distillation target of
unsupervised early exits), so "accuracy" becomes agreement with the base.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd

from .policy import (CRITERIA, Selection, SelectionError, Stage, answers, apply, exit_ratios, midpoint_thresholds,
                     near_threshold, per_sample_cost, stage_costs)
from .criteria import (CP_REPORT_DELTA, GUARANTEE_GRID, PUBLIC_GRID, SMALL_CALIBRATION,  # noqa: F401 (re-exported)
                       criterion_names, get_criterion)
from .risk import METHODS, check_delta, loss_upper_bound
from .backends import DEFAULT_BACKEND
from .zoo import Zoo, ZooError

CALIBRATIONS = (None, "temperature")  # how confidences may be recalibrated before thresholds are chosen


def check_calibration(calibrate: str | None) -> None:
    """The one check of a ``calibrate`` option (selector, zoo reads and the exit-method comparison)."""
    if calibrate not in CALIBRATIONS:
        raise SelectionError(f"calibrate must be one of {', '.join(map(str, CALIBRATIONS))}, got {calibrate!r}")

# guaranteed chains: paths (1 − t1) = r · (1 − t2), t2 walking down GUARANTEE_GRID
CHAIN_PATHS = (1.0, 0.5, 0.25)
MAX_STAGES = 3


# --- one saver's order and the pair sweep -----------------------------------------------------------

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
    are registered in :mod:`tinysaver.criteria`.
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


# --- data access ----------------------------------------------------------------------------------------

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
            import warnings

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


def load_split_data(zoo: Zoo, split: str, models: Sequence[str], calibrate: str | None = None) -> SplitData:
    """Stored predictions; with ``calibrate='temperature'``, the confidences of ``tinysaver zoo calibrate``."""
    check_calibration(calibrate)
    read = zoo.calibrated_predictions if calibrate else zoo.predictions
    preds = {m: read(m, split) for m in models}
    labels = next(iter(preds.values())).labels
    temps = {m: zoo.temperature(m) for m in models} if calibrate else {}
    return SplitData(split, labels, {m: p.pred for m, p in preds.items()}, {m: p.conf for m, p in preds.items()},
                     temps)


def _subset(sd: SplitData, idx: np.ndarray, name: str) -> SplitData:
    return SplitData(name, sd.labels[idx], {m: v[idx] for m, v in sd.pred.items()},
                     {m: v[idx] for m, v in sd.conf.items()}, sd.temperature)


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
            perm = np.random.default_rng(seed).permutation(len(whole.labels))
            half = len(perm) // 2
            return (_subset(whole, np.sort(perm[:half]), f"{splits[0]}[calib]"),
                    _subset(whole, np.sort(perm[half:]), f"{splits[0]}[holdout]"))
        else:
            raise SelectionError(f"zoo {zoo.name!r} has no splits with predictions")
    if calib_split is None:
        raise SelectionError("give the calibration split too")
    if test_split == calib_split:
        raise SelectionError("the held-out split must differ from the calibration split")
    calib = load_split_data(zoo, calib_split, models, calibrate)
    test = load_split_data(zoo, test_split, models, calibrate) if test_split else None
    return calib, test


# --- selection ------------------------------------------------------------------------------------------

@dataclass
class SelectorConfig:
    """How to select. The CLI's defaults are these (one place)."""

    criterion: str = "zero"
    tolerance: float = 0.0  # accuracy points
    delta: float = 0.1
    cost: str = "flops"
    label_free: bool = False
    max_stages: int = 2  # 2 = saver + base; 3 also searches chains S1 → S2 → base
    calib_split: str | None = None
    test_split: str | None = None
    seed: int = 0
    guarantee_method: str = "wsr"
    calibrate: str | None = None  # "temperature": thresholds on temperature-scaled confidences

    def __post_init__(self) -> None:
        crit = get_criterion(self.criterion)
        if not np.isfinite(self.tolerance) or self.tolerance < 0:
            raise SelectionError(f"tolerance ε must be ≥ 0 accuracy points, got {self.tolerance}")
        if self.tolerance > 100:
            raise SelectionError(f"tolerance ε is in accuracy points, at most 100, got {self.tolerance}")
        if not crit.takes_tolerance and self.tolerance != 0:
            takes = " or ".join(n for n in criterion_names() if get_criterion(n).takes_tolerance)
            raise SelectionError(f"--criterion {self.criterion} takes no tolerance, so --tolerance {self.tolerance:g} "
                                 f"would be ignored: drop it, or use --criterion {takes}")
        check_delta(self.delta, SelectionError)
        if not 2 <= self.max_stages <= MAX_STAGES:
            raise SelectionError(f"max_stages must be 2 (saver + base) or {MAX_STAGES} (two savers + base); "
                                 f"longer chains are not searched, got {self.max_stages}")
        if self.max_stages > 2 and crit.chains is None:
            chains = "/".join(n for n in criterion_names() if get_criterion(n).chains)
            raise SelectionError(f"{self.criterion} is a two-stage rule and has no chain form; "
                                 f"use --max-stages 2, or {chains} for chains")
        check_calibration(self.calibrate)
        if self.guarantee_method not in METHODS:
            raise SelectionError(f"guarantee method must be one of {', '.join(METHODS)}, got {self.guarantee_method!r}")

    @property
    def target(self) -> str:
        return "base-agreement" if self.label_free else "labels"

    @classmethod
    def from_options(cls, options) -> "SelectorConfig":
        """From any object with some of these fields as attributes (an argparse namespace, say)."""
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(options, k) for k in names if getattr(options, k, None) is not None})


def selection_for(zoo: Zoo, base: str | None, cfg: SelectorConfig | None = None, savers: Sequence[str] | None = None,
                  threshold: float | None = None, selection: str | None = None,
                  from_selection: bool = False) -> Selection:
    """The one way a command gets its policy: a saved selection file, a saver with a given threshold,
    or the selector (restricted to ``savers`` when given; ``from_selection`` says the user asked for
    the selector over the whole zoo). ``base`` may be None with a saved selection, which names its
    own. Validated before any model loads."""
    if base is None and selection is None:
        raise SelectionError("give --base (or --selection FILE, which names its base)")
    if from_selection and savers:
        raise SelectionError("--from-selection runs the selector over the zoo; drop --saver, or drop "
                             "--from-selection to select among the given savers")
    if selection is not None:
        if savers or threshold is not None:
            raise SelectionError("give either a saved selection or --saver/--threshold, not both")
        sel = Selection.load(selection)
        if base is not None and sel.base != base:
            raise SelectionError(f"{selection} selects for base {sel.base!r}, not {base!r}")
        if sel.zoo != zoo.name:
            raise SelectionError(f"{selection} was selected in zoo {sel.zoo!r}, not {zoo.name!r}")
        for m in sel.models:
            zoo.model(m)
        return sel
    if threshold is not None:
        if not savers or len(savers) != 1:
            raise SelectionError("--threshold needs exactly one --saver (it is that saver's threshold)")
        for m in (savers[0], base):
            zoo.model(m)
        return Selection.manual(zoo.name, [(savers[0], threshold)], base)
    return select(zoo, base, cfg, savers=savers).best


@dataclass
class Candidate:
    stages: list[Stage]
    cost: float      # mean cost per image on the calibration split
    correct: int     # calibration samples the cascade gets right


def _targets(sd: SplitData, base: str, label_free: bool) -> np.ndarray:
    return sd.pred[base] if label_free else sd.labels


def _chain_sequences(pool_size: int) -> int:
    """Guaranteed chains: one test sequence per pair of savers and threshold path."""
    return pool_size * (pool_size - 1) // 2 * len(CHAIN_PATHS)


def _pair_candidates(base: str, pool: Sequence[str], calib: SplitData, costs: dict[str, float],
                     cfg: SelectorConfig, orders: dict[str, SaverOrder] | None, delta_seq: float,
                     exhausted: list[str] | None = None) -> list[Candidate]:
    """The cheapest passing policy of each saver. Savers whose whole test sequence passed (every
    threshold of the grid certified) are appended to ``exhausted``: their δ is free to pass on."""
    target = _targets(calib, base, cfg.label_free)
    base_correct = calib.pred[base] == target
    n = len(target)
    out = []
    for s in pool:
        so = orders[s] if orders and not cfg.label_free else SaverOrder.build(calib.conf[s], calib.pred[s] == target)
        k, t = best_exit(so, base_correct, cfg.criterion, cfg.tolerance, delta_seq, cfg.guarantee_method)
        if exhausted is not None and k == pair_candidates(so, cfg.criterion)[0][-1]:
            exhausted.append(s)  # the sequence's last candidate passed (equal k: the same policy)
        if k == 0:
            continue
        correct = int(so.cum_correct[k] + base_correct[so.order][k:].sum())
        out.append(Candidate([Stage(s, t), Stage(base, None)], costs[s] + (1 - k / n) * costs[base], correct))
    return out


def _chain_exact(c1, c2, s1_ok, s2_ok, b_ok, cost1: float, cost2: float, cost_b: float, slack: float,
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


def _chain_candidates(base: str, pool: Sequence[str], calib: SplitData, costs: dict[str, float],
                      cfg: SelectorConfig, beat: float, delta_seq: float) -> list[Candidate]:
    """Chains S1 → S2 → base (S1 cheaper than S2) that cost less than ``beat`` per image."""
    target = _targets(calib, base, cfg.label_free)
    ok = {m: calib.pred[m] == target for m in (*pool, base)}
    n = len(target)
    out = []
    crit = get_criterion(cfg.criterion)
    for s1, s2 in itertools.combinations(sorted(pool, key=lambda m: costs[m]), 2):
        if crit.chains == "exact":
            slack = cfg.tolerance * n / 100 + 1e-9 if crit.takes_tolerance else 0
            found = _chain_exact(calib.conf[s1], calib.conf[s2], ok[s1], ok[s2], ok[base].astype(np.int64),
                                 costs[s1], costs[s2], costs[base], slack, beat * n)
            if found is None:
                continue
            _, t1, t2 = found
            stages = [Stage(s1, t1), Stage(s2, t2), Stage(base, None)]
        else:  # "paths": fixed paths of threshold pairs, each a test sequence
            stages = _chain_guaranteed(s1, s2, base, calib, ok, cfg, delta_seq, costs)
            if stages is None:
                continue
        cand = _candidate(stages, calib, target, costs)
        if cand.cost < beat:
            out.append(cand)
            beat = cand.cost
    return out


def _chain_guaranteed(s1, s2, base, calib: SplitData, ok, cfg: SelectorConfig, delta_seq: float,
                      costs: dict[str, float]) -> list[Stage] | None:
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

        passing = criterion_passes(cfg.criterion, outcomes, len(t2), n, cfg.tolerance, delta_seq, cfg.guarantee_method)
        for j in np.flatnonzero(passing)[1:]:
            c = float(per_sample_cost(seen[int(j)], cum).mean())
            if best is None or c < best[0]:
                best = (c, [Stage(s1, float(t1[j])), Stage(s2, float(t2[j])), Stage(base, None)])
    return None if best is None else best[1]


def _candidate(stages: list[Stage], sd: SplitData, target: np.ndarray, costs: dict[str, float]) -> Candidate:
    ans, where = sd.outcome(stages, target)
    cost = float(per_sample_cost(where, stage_costs([costs[s.model] for s in stages])).mean())
    return Candidate(stages, cost, int((ans == target).sum()))


@dataclass
class SelectionResult:
    """What :func:`select` found for one base.

    ``candidates``: up to ``top`` policies that cost less than the base alone, cheapest first, each
    a full :class:`Selection` with its calibration and held-out results; empty when no saver
    qualifies. ``best`` is the first of them, or the base alone (with the reason in its
    ``message``). :func:`tinysaver.report.render` prints it."""

    best: Selection
    candidates: list[Selection] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One summary row per candidate (the columns of :func:`tinysaver.report.summary_row`)."""
        from .report import summary_row

        return pd.DataFrame([summary_row(c) for c in self.candidates])


def select(zoo: Zoo, base: str, cfg: SelectorConfig | None = None, savers: Sequence[str] | None = None,
           top: int = 5) -> SelectionResult:
    """Best cascade for ``base`` and the next best candidates (calibration split).

    ``savers`` limits the candidates (default: every cheaper measured model of the zoo).
    """
    cfg = cfg or SelectorConfig()
    entry = zoo.entry(base)
    if not zoo.has_predictions(base):
        raise SelectionError(f"{base!r} is {entry.status} in zoo {zoo.name!r}: it has no predictions to select on")
    costs = available_costs(zoo, zoo.measured(), cfg.cost)
    costs[base] = model_cost(zoo, base, cfg.cost)  # the base must have one: this names what is missing
    ncls = entry.num_classes
    if savers is not None:
        for s in savers:
            if s == base:
                raise SelectionError(f"a model cannot be its own saver: {s!r} is the base")
            se = zoo.entry(s)
            if not zoo.has_predictions(s):
                raise SelectionError(f"saver {s!r} has no predictions in zoo {zoo.name!r}")
            costs[s] = model_cost(zoo, s, cfg.cost)
            if se.num_classes != ncls:
                raise SelectionError(f"saver {s!r} predicts {se.num_classes} classes but base {base!r} "
                                     f"predicts {ncls}: their class spaces differ")
        pool = list(dict.fromkeys(savers))
    else:
        pool = [m for m in costs if m != base and costs[m] < costs[base]
                and zoo.entry(m).num_classes == ncls]
    calib, test = calibration_and_test(zoo, [base, *pool], cfg.calib_split, cfg.test_split, cfg.seed, cfg.calibrate)
    return _select_on(zoo.name, base, pool, costs, calib, test, cfg, top)


def _select_on(zoo_name: str, base: str, pool: Sequence[str], costs: dict[str, float], calib: SplitData,
               test: SplitData | None, cfg: SelectorConfig, top: int = 5,
               orders: dict[str, SaverOrder] | None = None) -> SelectionResult:
    # guaranteed: the pairs are tested first, exactly as with max_stages=2 (δ split evenly over the
    # savers, Bonferroni); a saver whose whole sequence passed passes its share on to the chains
    # (graphical testing: δ flows only from hypotheses already rejected), so chains never cost a pair
    delta_pair = cfg.delta / max(len(pool), 1)
    exhausted: list[str] = []
    certifies = get_criterion(cfg.criterion).guarantee
    cands = _pair_candidates(base, pool, calib, costs, cfg, orders, delta_pair, exhausted if certifies else None)
    chain_delta = delta_pair * len(exhausted) if certifies else cfg.delta
    if cfg.max_stages > 2 and len(pool) >= 2 and chain_delta > 0:
        best2 = min((c.cost for c in cands), default=costs[base])
        cands += _chain_candidates(base, pool, calib, costs, cfg, best2 * (1 - 1e-12),
                                   chain_delta / _chain_sequences(len(pool)))
    useful = sorted((c for c in cands if c.cost < costs[base]), key=lambda c: (c.cost, -c.correct))
    if not useful:
        why = "no cheaper model in the zoo" if not pool else f"no saver meets the {cfg.criterion} criterion"
        if pool and get_criterion(cfg.criterion).takes_tolerance:
            why += _tolerance_hint(base, pool, calib, costs, cfg, orders, delta_pair)
        sel = _report([Stage(base, None)], zoo_name, base, calib, test, costs, cfg, len(pool),
                      message=f"no saver: run the base alone ({why})")
        return SelectionResult(sel)
    rows = [_report(c.stages, zoo_name, base, calib, test, costs, cfg, len(pool), chain_delta=chain_delta)
            for c in useful[:top]]
    return SelectionResult(rows[0], rows)


# tolerances (accuracy points) tried, smallest first, to say which would let a saver through
TOLERANCE_LADDER = (0.25, 0.5, 1.0, 2.0, 5.0)


def _tolerance_hint(base, pool, calib, costs, cfg: SelectorConfig, orders, delta_pair: float) -> str:
    """``at ε = 1 points a saver would be selected (--tolerance 1)``, for the smallest tolerance of
    :data:`TOLERANCE_LADDER` above ``cfg``'s at which a pair passes on this calibration set; or
    that none of them would."""
    for eps in (t for t in TOLERANCE_LADDER if t > cfg.tolerance):
        tried = replace(cfg, tolerance=eps)
        found = _pair_candidates(base, pool, calib, costs, tried, orders, delta_pair, None)
        if any(c.cost < costs[base] for c in found):
            return f" at ε = {cfg.tolerance:g} points; at ε = {eps:g} a saver would be selected (--tolerance {eps:g})"
    return f" at ε = {cfg.tolerance:g} points, nor at any up to {TOLERANCE_LADDER[-1]:g}"


def _report(stages: list[Stage], zoo_name: str, base: str, calib: SplitData, test: SplitData | None,
            costs: dict[str, float], cfg: SelectorConfig, pool_size: int, message: str = "",
            chain_delta: float = 0.0) -> Selection:
    """The Selection of a policy: its calibration and held-out results, all through policy.apply."""
    stages = [Stage(s.model, s.threshold, calib.temperature.get(s.model, 1.0)) for s in stages]
    cum = stage_costs([costs[s.model] for s in stages])
    target = _targets(calib, base, cfg.label_free)
    ans, where = calib.outcome(stages, target)
    guarantee = ""
    certifies = get_criterion(cfg.criterion).guarantee
    if certifies:
        guarantee = (f"P(expected loss > {cfg.tolerance} pts) ≤ {cfg.delta}: {cfg.guarantee_method} tests in fixed "
                     f"sequence, δ split over {pool_size} saver sequences")
        if cfg.max_stages > 2:
            guarantee += (f", then {chain_delta:.3g} of it, passed on by saver sequences that passed to their end, "
                          f"over {_chain_sequences(pool_size)} chain sequences" if chain_delta > 0 else
                          "; no saver sequence passed to its end, so no δ was left for chains")
        guarantee += "; assumes exchangeable samples"
    sel = Selection(zoo=zoo_name, base=base, stages=stages, criterion=cfg.criterion, tolerance=cfg.tolerance,
                    delta=cfg.delta if certifies else None, cost_metric=cfg.cost,
                    target=cfg.target, calib_split=calib.name, test_split=test.name if test else None,
                    cost_base=costs[base], cost_cascade=float(per_sample_cost(where, cum).mean()),
                    exit_ratio_calib=exit_ratios(where, len(stages)),
                    acc_base_calib=float((calib.pred[base] == target).mean()),
                    acc_cascade_calib=float((ans == target).mean()),
                    near_threshold_calib=near_threshold([calib.conf[s.model] for s in stages[:-1]],
                                                        [s.threshold for s in stages[:-1]]),
                    calib_samples=len(target), guarantee=guarantee, message=message)
    if not certifies:
        base_ok, ok = calib.pred[base] == target, ans == target
        harm, repair = int((base_ok & ~ok).sum()), int((ok & ~base_ok).sum())
        sel.cp_bound_points = float(100 * loss_upper_bound(harm, repair, len(target), CP_REPORT_DELTA))
    if test is not None:
        t_target = _targets(test, base, cfg.label_free)
        t_ans, t_where = test.outcome(stages, t_target)
        sel.acc_base_test = float((test.pred[base] == t_target).mean())
        sel.acc_cascade_test = float((t_ans == t_target).mean())
        sel.exit_ratio_test = exit_ratios(t_where, len(stages))
    return sel


def select_all(zoo: Zoo, cfg: SelectorConfig | None = None) -> tuple[list[Selection], pd.DataFrame]:
    """Whole-zoo selection, one row per base (like Table 5 of the paper).

    Each saver's confidences are sorted once and reused for every base.
    """
    cfg = cfg or SelectorConfig()
    models = zoo.measured()
    if not models:
        raise SelectionError(f"zoo {zoo.name!r} has no measured models")
    costs = available_costs(zoo, models, cfg.cost)
    if not costs:
        model_cost(zoo, models[0], cfg.cost)  # raises, naming what is missing
    models = [m for m in models if m in costs]
    calib, test = calibration_and_test(zoo, models, cfg.calib_split, cfg.test_split, cfg.seed, cfg.calibrate)
    return select_all_arrays(zoo.name, models, costs, {m: zoo.entry(m).num_classes for m in models},
                             calib, test, cfg)


def select_all_arrays(zoo_name: str, models: Sequence[str], costs: dict[str, float], num_classes: dict,
                      calib: SplitData, test: SplitData | None, cfg: SelectorConfig) -> tuple[list[Selection], pd.DataFrame]:
    from .report import summary_row

    orders = None
    if not cfg.label_free:
        orders = {m: SaverOrder.build(calib.conf[m], calib.pred[m] == calib.labels) for m in models}
    sels = []
    for base in sorted(models, key=lambda m: costs[m]):
        pool = [m for m in models if costs[m] < costs[base] and num_classes[m] == num_classes[base]]
        sels.append(_select_on(zoo_name, base, pool, costs, calib, test, cfg, top=1, orders=orders).best)
    return sels, pd.DataFrame([summary_row(s) for s in sels])


__all__ = ["SelectorConfig", "Selection", "SelectionResult", "Stage", "select", "select_all", "selection_for", "SaverOrder", "best_exit",
           "criterion_passes", "CRITERIA", "SelectionError", "ZooError", "SplitData", "model_cost"]
