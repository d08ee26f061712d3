"""Choose, for a base model, the saver model(s) and confidence threshold(s) of least expected cost.

A cascade runs the saver S first; a sample exits when S's max-softmax confidence is ≥ t, and the
rest go to the base B (the rule itself is `tinysaver.policy.apply`). With ``k`` samples
exiting out of ``n``, the relative cost is ``cost(S)/cost(B) + (1 − k/n)``.

Every policy is scored by two counts over the calibration samples: *harm* (the base was right, the
cascade is wrong) and *repair* (the reverse). One function, `criterion_passes`, turns those
counts into "meets the criterion" for pairs and chains alike (tolerance ε in accuracy points):

- ``zero``: repair − harm ≥ 0, i.e. the cascade is at least as accurate as the base;
- ``bounded``: repair − harm ≥ −ε·n/100;
- ``subset``: the rule of the paper's public code. Thresholds 1, 0.999, … 0.001 are scanned
  downward; exits are the samples with confidence > t; the answer is the first t where the saver
  is less accurate than the base on the exited samples (or 0.001 if there is none). Pairs only;
- ``guaranteed``: with probability ≥ 1 − δ over the calibration draw, the expected loss on new
  samples from the same distribution is ≤ ε. Policies are tested with `tinysaver.risk` along
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

The parts live beside this file: the cost model in `tinysaver.costs`, the splits in
`tinysaver.splits`, the pair sweep in `tinysaver.sweep`, the chain search in
`tinysaver.chains`; this module turns a configuration into the cheapest passing policy and
its report.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd

from .chains import MAX_STAGES, chain_candidates, chain_sequences
from .costs import available_costs, model_cost
from .criteria import CP_REPORT_DELTA, DEFAULT_CRITERION, criterion_names, get_criterion
from .policy import Selection, SelectionError, Stage, exit_ratios, near_threshold, per_sample_cost, stage_costs
from .report import summary_row
from .risk import METHODS, check_delta, loss_upper_bound
from .splits import SplitData, calibration_and_test, check_calibration
from .sweep import Candidate, SaverOrder, best_exit, pair_candidates
from .zoo import Zoo


@dataclass
class SelectorConfig:
    """How to select. The CLI's defaults are these (one place)."""

    criterion: str = DEFAULT_CRITERION
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


@dataclass(frozen=True)
class PolicyRequest:
    """The policy a command asks for, checked when built (before any zoo loads): a saved selection
    file (``selection``, which names its base), one saver at a given ``threshold``, or the selector
    with ``config`` (restricted to ``savers`` when given; ``from_selection`` says the user asked for
    the selector over the whole zoo)."""

    base: str | None = None
    config: SelectorConfig = field(default_factory=SelectorConfig)
    savers: tuple[str, ...] | None = None
    threshold: float | None = None
    selection: str | None = None
    from_selection: bool = False

    def __post_init__(self) -> None:
        if self.savers is not None:
            object.__setattr__(self, "savers", tuple(self.savers))
        if self.base is None and self.selection is None:
            raise SelectionError("give --base (or --selection FILE, which names its base)")
        if self.from_selection and self.savers:
            raise SelectionError("--from-selection runs the selector over the zoo; drop --saver, or drop "
                                 "--from-selection to select among the given savers")
        if self.selection is not None and (self.savers or self.threshold is not None):
            raise SelectionError("give either a saved selection or --saver/--threshold, not both")
        if self.threshold is not None and (not self.savers or len(self.savers) != 1):
            raise SelectionError("--threshold needs exactly one --saver (it is that saver's threshold)")

    @classmethod
    def from_options(cls, options) -> PolicyRequest:
        """From an argparse namespace with the cascade commands' options (``--base``, ``--saver``,
        ``--threshold``, ``--selection``, ``--from-selection`` and the selector's)."""
        return cls(getattr(options, "base", None), SelectorConfig.from_options(options),
                   getattr(options, "saver", None), getattr(options, "threshold", None),
                   getattr(options, "selection", None), bool(getattr(options, "from_selection", False)))


def selection_for(zoo: Zoo, request: PolicyRequest) -> Selection:
    """The one way a command gets its policy over ``zoo`` (see `PolicyRequest`). The models
    are not looked up here: `tinysaver.stageplan.resolve` does that, once, before any loads."""
    r = request
    if r.selection is not None:
        sel = Selection.load(r.selection)
        if r.base is not None and sel.base != r.base:
            raise SelectionError(f"{r.selection} selects for base {sel.base!r}, not {r.base!r}")
        if sel.zoo != zoo.name:
            raise SelectionError(f"{r.selection} was selected in zoo {sel.zoo!r}, not {zoo.name!r}")
        return recomputed(zoo, sel, str(r.selection))
    if r.threshold is not None:
        return Selection.manual(zoo.name, [(r.savers[0], r.threshold)], r.base)
    return select(zoo, r.base, r.config, savers=r.savers).best


def recomputed(zoo: Zoo, sel: Selection, source: str = "the selection") -> Selection:
    """``sel`` with its statistics (exit ratios, accuracies, cost) computed again from ``zoo`` for
    the thresholds it holds, so that what a command prints is true of the policy it runs. A file
    whose recorded statistics differ (hand-edited thresholds, an invented chain) is said to, in one
    warning line, and loses its guarantee: it was certified for other thresholds. Splits the zoo does
    not have by name (the seeded halves of a zoo with one split) are cut again with the seed 0."""
    for s in sel.stages:
        zoo.entry(s.model)  # an unknown model is named here, before any array is read
        if not zoo.has_predictions(s.model):
            return sel  # published-only entries: nothing to recompute from, the file's record stands
    plain = sel.calib_split in zoo.splits and (sel.test_split is None or sel.test_split in zoo.splits)
    cfg = SelectorConfig(cost=sel.cost_metric, label_free=sel.target == "base-agreement",
                         calib_split=sel.calib_split if plain else None, test_split=sel.test_split if plain else None,
                         calibrate="temperature" if any(s.temperature != 1.0 for s in sel.stages) else None)
    calib, test = calibration_and_test(zoo, sel.models, cfg.calib_split, cfg.test_split, cfg.seed, cfg.calibrate)
    costs = {m: model_cost(zoo, m, cfg.cost) for m in sel.models}
    fresh = _report(sel.stages, zoo.name, sel.base, calib, test, costs, cfg, 0, message=sel.message)
    fresh.criterion, fresh.tolerance, fresh.delta, fresh.guarantee = sel.criterion, sel.tolerance, sel.delta, sel.guarantee
    fresh.gears, fresh.schema_version = sel.gears, sel.schema_version  # the gear plan travels with its policy
    if get_criterion(sel.criterion).guarantee:  # a certified selection reports its guarantee, not the CP bound
        fresh.cp_bound_points = sel.cp_bound_points
    said = np.array([*sel.exit_ratio_calib, sel.acc_cascade_calib or 0.0, sel.cost_cascade or 0.0], dtype=float)
    now = np.array([*fresh.exit_ratio_calib, fresh.acc_cascade_calib, fresh.cost_cascade], dtype=float)
    if said.shape != now.shape or not np.allclose(said, now, rtol=1e-6, atol=1e-9):
        before = sum(sel.exit_ratio_calib[:-1]) if sel.exit_ratio_calib else float("nan")
        warnings.warn(f"{source}: its recorded statistics do not match its thresholds (exit ratio {before:.1%} "
                      f"recorded, {sum(fresh.exit_ratio_calib[:-1]):.1%} on the zoo's {calib.name}); showing the "
                      "recomputed ones, with no guarantee")
        fresh.guarantee, fresh.message = "", "thresholds differ from the selection's record: no guarantee holds"
    return fresh


def _pair_candidates(base: str, pool: Sequence[str], calib: SplitData, costs: dict[str, float],
                     cfg: SelectorConfig, orders: dict[str, SaverOrder] | None, delta_seq: float,
                     exhausted: list[str] | None = None) -> list[Candidate]:
    """The cheapest passing policy of each saver. Savers whose whole test sequence passed (every
    threshold of the grid certified) are appended to ``exhausted``: their δ is free to pass on."""
    target = calib.targets(base, cfg.label_free)
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



@dataclass
class SelectionResult:
    """What `select` found for one base.

    ``candidates``: up to ``top`` policies that cost less than the base alone, cheapest first, each
    a full `Selection` with its calibration and held-out results; empty when no saver
    qualifies. ``best`` is the first of them, or the base alone (with the reason in its
    ``message``). `tinysaver.report.render` prints it."""

    best: Selection
    candidates: list[Selection] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One summary row per candidate (the columns of `tinysaver.report.summary_row`)."""
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
        cands += chain_candidates(base, pool, calib, costs, criterion=cfg.criterion, tolerance=cfg.tolerance,
                                  method=cfg.guarantee_method, label_free=cfg.label_free, beat=best2 * (1 - 1e-12),
                                  delta_seq=chain_delta / chain_sequences(len(pool)))
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
    `TOLERANCE_LADDER` above ``cfg``'s at which a pair passes on this calibration set; or
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
    target = calib.targets(base, cfg.label_free)
    ans, where = calib.outcome(stages, target)
    guarantee = ""
    certifies = get_criterion(cfg.criterion).guarantee
    if certifies:
        guarantee = (f"P(expected loss > {cfg.tolerance} pts) ≤ {cfg.delta}: {cfg.guarantee_method} tests in fixed "
                     f"sequence, δ split over {pool_size} saver sequences")
        if cfg.max_stages > 2:
            guarantee += (f", then {chain_delta:.3g} of it, passed on by saver sequences that passed to their end, "
                          f"over {chain_sequences(pool_size)} chain sequences" if chain_delta > 0 else
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
        t_target = test.targets(base, cfg.label_free)
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
    orders = None
    if not cfg.label_free:
        orders = {m: SaverOrder.build(calib.conf[m], calib.pred[m] == calib.labels) for m in models}
    sels = []
    for base in sorted(models, key=lambda m: costs[m]):
        pool = [m for m in models if costs[m] < costs[base] and num_classes[m] == num_classes[base]]
        sels.append(_select_on(zoo_name, base, pool, costs, calib, test, cfg, top=1, orders=orders).best)
    return sels, pd.DataFrame([summary_row(s) for s in sels])


__all__ = ["PolicyRequest", "SelectorConfig", "SelectionResult", "select", "select_all", "select_all_arrays", "selection_for"]
