"""Choose, for a base model, the saver model(s) and confidence threshold(s) of least expected cost.

A cascade runs the saver S first; a sample exits when S's max-softmax confidence is ≥ t, and the
rest go to the base B. With ``k`` samples exiting out of ``n``, the relative cost is
``cost(S)/cost(B) + (1 − k/n)`` and the accuracy change against the base alone is
``(Σ_exited correct_S − Σ_exited correct_B) / n``.

Sorting S's confidences once (descending) turns every threshold into a prefix of that order, so
one cumulative sum per (saver, base) pair scores all thresholds exactly. Only prefix lengths at
confidence boundaries are valid, so tied confidences always exit together.

Criteria (``tolerance`` ε is in accuracy points, 1.0 = 1 %):

- ``zero``: cascade accuracy ≥ base accuracy on the calibration split;
- ``bounded``: cascade accuracy ≥ base accuracy − ε;
- ``subset``: scanning t downward, stop at the first t where S's accuracy on the exited samples
  falls below B's accuracy on those samples (the rule of the paper's public code);
- ``guaranteed``: with probability ≥ 1 − δ over the calibration draw, the expected loss on new
  samples from the same distribution is ≤ ε. Per threshold, loss = P(exit turns a correct base
  answer wrong) − P(exit repairs a wrong one); we bound the first by its Clopper–Pearson upper
  limit and the second by its lower limit (each at δ/2), and test thresholds in fixed sequence
  from high t to low t, stopping at the first that fails (which keeps the error rate at δ with no
  multiplicity correction). Assumption: calibration and future samples are exchangeable.

Label-free mode replaces the labels with the base's own predictions (the distillation target of
unsupervised early exits), so "accuracy" becomes agreement with the base.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .zoo import Zoo, ZooError

CRITERIA = ("zero", "bounded", "subset", "guaranteed")


class SelectionError(ValueError):
    pass


# --- the exact sweep --------------------------------------------------------------------------------

@dataclass
class SaverOrder:
    """One saver's confidences sorted once, reused for every base.

    ``order`` sorts samples by descending confidence; ``valid[k]`` says whether exiting exactly the
    first ``k`` samples is reachable by some threshold (k = 0..n); ``thresholds[k]`` is that
    threshold (``inf`` for k = 0).
    """

    order: np.ndarray
    valid: np.ndarray
    thresholds: np.ndarray
    cum_correct: np.ndarray  # (n+1,) S's correct answers among the first k

    @classmethod
    def build(cls, conf: np.ndarray, correct: np.ndarray) -> "SaverOrder":
        conf = np.asarray(conf, dtype=np.float64)
        n = len(conf)
        order = np.argsort(-conf, kind="stable")
        sc = conf[order]
        valid = np.ones(n + 1, dtype=bool)
        if n > 1:
            valid[1:n] = sc[:-1] > sc[1:]  # cannot split a run of tied confidences
        thresholds = np.concatenate([[np.inf], sc])
        cum = np.concatenate([[0], np.cumsum(np.asarray(correct, dtype=np.int64)[order])])
        return cls(order, valid, thresholds, cum)

    @property
    def n(self) -> int:
        return len(self.order)


def clopper_pearson(k: np.ndarray, n: int, alpha: float, upper: bool) -> np.ndarray:
    """One-sided Clopper–Pearson limit of a binomial rate with ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    if upper:
        return np.where(k >= n, 1.0, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)))
    return np.where(k <= 0, 0.0, beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1))


def feasible_exits(so: SaverOrder, base_correct: np.ndarray, criterion: str, tolerance: float = 0.0,
                   delta: float = 0.1) -> np.ndarray:
    """Boolean (n+1,) mask of exit counts k that meet ``criterion`` for this base."""
    n = so.n
    bc = np.asarray(base_correct, dtype=np.int64)[so.order]
    cum_b = np.concatenate([[0], np.cumsum(bc)])
    diff = so.cum_correct - cum_b  # correct(cascade) − correct(base) when the first k exit
    ok = so.valid.copy()
    if criterion == "zero":
        ok &= diff >= 0
    elif criterion == "bounded":
        ok &= diff >= -tolerance / 100.0 * n - 1e-9
    elif criterion == "subset":
        bad = np.flatnonzero(so.valid & (diff < 0))
        if len(bad):
            ok[bad[0]:] = False  # stop at the first threshold (scanning down) where S trails B on the exits
    elif criterion == "guaranteed":
        sc_sorted = so.cum_correct
        # harm: S wrong where B right; repair: S right where B wrong, among the first k
        s_right = np.diff(sc_sorted)
        harm = np.concatenate([[0], np.cumsum((s_right == 0) & (bc == 1))])
        repair = np.concatenate([[0], np.cumsum((s_right == 1) & (bc == 0))])
        ucb = clopper_pearson(harm, n, delta / 2, upper=True) - clopper_pearson(repair, n, delta / 2, upper=False)
        passed = ucb <= tolerance / 100.0
        passed[0] = True  # no exits: no loss
        fail = np.flatnonzero(so.valid & ~passed)
        if len(fail):
            ok[fail[0]:] = False  # fixed-sequence testing: stop at the first failure
        ok &= passed
    else:
        raise SelectionError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    ok[0] = True
    return ok


def best_exit(so: SaverOrder, base_correct: np.ndarray, criterion: str, tolerance: float, delta: float) -> int:
    """The largest feasible exit count (cost falls as more samples exit)."""
    return int(np.flatnonzero(feasible_exits(so, base_correct, criterion, tolerance, delta))[-1])


# --- results -----------------------------------------------------------------------------------------

@dataclass
class Stage:
    model: str
    threshold: float | None  # None for the base, which answers everything that reaches it


@dataclass
class Selection:
    """A cascade chosen for one base; exactly what :func:`tinysaver.cascade.build_cascade` takes.

    Costs are in the unit of ``cost_metric`` per image (FLOPs, or ms for latency). Accuracies are
    fractions in [0, 1]; with ``target == 'base-agreement'`` they are agreement with the base.
    """

    zoo: str
    base: str
    stages: list[Stage]
    criterion: str
    tolerance: float
    delta: float | None
    cost_metric: str
    target: str  # 'labels' or 'base-agreement'
    calib_split: str
    test_split: str | None
    cost_base: float
    cost_cascade: float
    exit_ratio_calib: list[float]
    acc_base_calib: float
    acc_cascade_calib: float
    exit_ratio_test: list[float] | None = None
    acc_base_test: float | None = None
    acc_cascade_test: float | None = None
    message: str = ""

    @property
    def found(self) -> bool:
        return len(self.stages) > 1

    @property
    def savers(self) -> list[Stage]:
        return self.stages[:-1]

    @property
    def saving_pct(self) -> float:
        return 100.0 * (1 - self.cost_cascade / self.cost_base)

    def summary_row(self) -> dict[str, Any]:
        r: dict[str, Any] = {
            "base": self.base,
            "saver": " → ".join(s.model for s in self.savers) or "(none)",
            "threshold": ", ".join(f"{s.threshold:.4f}" for s in self.savers) or "",
            "exit_ratio": round(float(sum(self.exit_ratio_calib[:-1])), 4) if self.found else 0.0,
            **self._costs(),
            "saving_%": round(self.saving_pct, 2),
            f"acc_base_{self.calib_split}": round(100 * self.acc_base_calib, 2),
            f"acc_cascade_{self.calib_split}": round(100 * self.acc_cascade_calib, 2),
        }
        if self.test_split is not None:
            r[f"acc_base_{self.test_split}"] = round(100 * (self.acc_base_test or 0), 2)
            r[f"acc_cascade_{self.test_split}"] = round(100 * (self.acc_cascade_test or 0), 2)
        return r

    def _costs(self) -> dict[str, float]:
        if self.cost_metric == "flops":
            return {"GFLOPs_base": round(self.cost_base / 1e9, 5), "GFLOPs_cascade": round(self.cost_cascade / 1e9, 5)}
        return {"ms_base": round(self.cost_base, 4), "ms_cascade": round(self.cost_cascade, 4)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data access --------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """Per-model predictions on one evaluation set, aligned sample by sample."""

    name: str
    labels: np.ndarray
    pred: dict[str, np.ndarray]
    conf: dict[str, np.ndarray]


def model_cost(zoo: Zoo, model: str, cost: str) -> float:
    """Cost per image of ``model``: FLOPs, or latency in ms/image from ``latency:DEVICE:bsN``."""
    e = zoo.model(model)
    if cost == "flops":
        if not e.get("flops"):
            raise SelectionError(f"{model!r} has no FLOPs in zoo {zoo.name!r}")
        return float(e["flops"])
    if cost.startswith("latency:"):
        parts = cost.split(":")
        if len(parts) != 3 or not parts[2].startswith("bs"):
            raise SelectionError(f"latency cost must look like latency:cpu:bs1, got {cost!r}")
        lat = e.get("latency") or {}
        if lat.get("device") != parts[1]:
            raise SelectionError(f"{model!r} has latency measured on {lat.get('device')!r}, not {parts[1]!r}")
        row = (lat.get("table") or {}).get(parts[2])
        if not row:
            raise SelectionError(f"{model!r} has no latency at {parts[2]}; measured: {', '.join(lat.get('table') or {})}")
        return float(row["ms_per_batch"]) / int(parts[2][2:])
    raise SelectionError(f"cost must be 'flops' or 'latency:DEVICE:bsN', got {cost!r}")


def load_split_data(zoo: Zoo, split: str, models: Sequence[str]) -> SplitData:
    preds = {m: zoo.predictions(m, split) for m in models}
    labels = next(iter(preds.values())).labels
    return SplitData(split, labels, {m: p.pred for m, p in preds.items()}, {m: p.conf for m, p in preds.items()})


def _subset(sd: SplitData, idx: np.ndarray, name: str) -> SplitData:
    return SplitData(name, sd.labels[idx], {m: v[idx] for m, v in sd.pred.items()},
                     {m: v[idx] for m, v in sd.conf.items()})


def calibration_and_test(zoo: Zoo, models: Sequence[str], calib_split: str | None, test_split: str | None,
                         seed: int = 0) -> tuple[SplitData, SplitData | None]:
    """Pick the selection split and the held-out split.

    Defaults: ``calib``/``test`` when the zoo has both; otherwise the zoo's first split cut into two
    seeded halves named ``<split>[calib]`` and ``<split>[holdout]``.
    """
    splits = list(zoo.splits)
    if calib_split is None and test_split is None:
        if "calib" in splits and "test" in splits:
            calib_split, test_split = "calib", "test"
        elif splits:
            whole = load_split_data(zoo, splits[0], models)
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
    calib = load_split_data(zoo, calib_split, models)
    test = load_split_data(zoo, test_split, models) if test_split else None
    return calib, test


# --- selection ----------------------------------------------------------------------------------------

@dataclass
class SelectorConfig:
    criterion: str = "zero"
    tolerance: float = 0.0  # accuracy points
    delta: float = 0.1
    cost: str = "flops"
    label_free: bool = False
    max_stages: int = 2  # 2 = saver + base; 3+ also searches chains
    calib_split: str | None = None
    test_split: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise SelectionError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not np.isfinite(self.tolerance) or self.tolerance < 0:
            raise SelectionError(f"tolerance ε must be ≥ 0 accuracy points, got {self.tolerance}")
        if not 0 < self.delta < 1:
            raise SelectionError(f"δ must be in (0, 1), got {self.delta}")
        if self.max_stages < 2:
            raise SelectionError("max_stages must be ≥ 2 (one saver and the base)")


@dataclass
class Candidate:
    savers: list[tuple[str, float]]
    exits: list[int]
    rel_cost: float
    cost: float
    correct: int


def _targets(sd: SplitData, base: str, label_free: bool) -> np.ndarray:
    return sd.pred[base] if label_free else sd.labels


def _cascade_outcome(sd: SplitData, stages: Sequence[Stage], target: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Per-sample answers of a cascade on ``sd`` and the fraction answered by each stage."""
    n = len(target)
    answer = np.full(n, -1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    ratios = []
    for st in stages:
        take = open_ if st.threshold is None else open_ & (sd.conf[st.model] >= st.threshold)
        answer[take] = sd.pred[st.model][take]
        ratios.append(float(take.sum()) / max(n, 1))
        open_ &= ~take
    return answer, ratios


def _pair_candidates(base: str, savers: Sequence[str], calib: SplitData, costs: dict[str, float],
                     cfg: SelectorConfig, orders: dict[str, SaverOrder] | None = None) -> list[Candidate]:
    target = _targets(calib, base, cfg.label_free)
    base_correct = calib.pred[base] == target
    n = len(target)
    out = []
    for s in savers:
        so = orders[s] if orders and not cfg.label_free else SaverOrder.build(calib.conf[s], calib.pred[s] == target)
        k = best_exit(so, base_correct, cfg.criterion, cfg.tolerance, cfg.delta)
        rel = costs[s] / costs[base] + (1 - k / n)
        bc_sorted = base_correct[so.order]
        correct = int(so.cum_correct[k] + bc_sorted[k:].sum())
        out.append(Candidate([(s, float(so.thresholds[k]))], [k], rel, rel * costs[base], correct))
    return out


def _chain_candidates(base: str, pool: Sequence[str], calib: SplitData, costs: dict[str, float],
                      cfg: SelectorConfig, two_stage: list[Candidate]) -> list[Candidate]:
    """Extend the best cascades with a cheaper front stage, keeping the criterion against the base.

    Dynamic programming over cost-sorted models: every chain ending in saver S2 → base is extended
    by each model cheaper than S2, whose threshold is swept exactly against the composite
    (S2 → base) treated as one model with per-sample cost and correctness.
    """
    target = _targets(calib, base, cfg.label_free)
    n = len(target)
    base_correct = calib.pred[base] == target
    frontier = [c for c in two_stage if c.exits[0] > 0]
    found: list[Candidate] = []
    for depth in range(3, cfg.max_stages + 1):
        nxt = []
        for c in frontier:
            stages = [Stage(m, t) for m, t in c.savers] + [Stage(base, None)]
            answer, _ = _cascade_outcome(calib, stages, target)
            comp_correct = answer == target
            # per-sample cost of the composite: each stage's cost until the sample exits
            comp_cost = np.zeros(n)
            open_ = np.ones(n, dtype=bool)
            for st in stages:
                comp_cost[open_] += costs[st.model]
                if st.threshold is not None:
                    open_ &= ~(calib.conf[st.model] >= st.threshold)
            front = c.savers[0][0]
            for s in pool:
                if costs[s] >= costs[front] or s in (m for m, _ in c.savers):
                    continue
                so = SaverOrder.build(calib.conf[s], calib.pred[s] == target)
                comp_sorted = comp_correct[so.order].astype(np.int64)
                # front stage answers the first k, the composite the rest; compare with the base alone
                rest = np.concatenate([np.cumsum(comp_sorted[::-1])[::-1], [0]])
                total_correct = so.cum_correct + rest
                gain = total_correct - int(base_correct.sum())
                feasible = so.valid.copy()
                if cfg.criterion == "zero":
                    feasible &= gain >= 0
                elif cfg.criterion in ("bounded", "guaranteed"):
                    # chains are reported under the empirical bound; the guarantee covers two stages
                    feasible &= gain >= -cfg.tolerance / 100.0 * n - 1e-9
                elif cfg.criterion == "subset":
                    cum_comp = np.concatenate([[0], np.cumsum(comp_sorted)])
                    bad = np.flatnonzero(so.valid & (so.cum_correct < cum_comp))
                    if len(bad):
                        feasible[bad[0]:] = False
                feasible[0] = False
                if not feasible.any():
                    continue
                cum_rest_cost = np.concatenate([np.cumsum(comp_cost[so.order][::-1])[::-1], [0.0]])
                total_cost = (costs[s] * n + cum_rest_cost) / n
                idx = np.flatnonzero(feasible)
                k = int(idx[np.argmin(total_cost[idx])])
                cand = Candidate([(s, float(so.thresholds[k]))] + c.savers, [k] + c.exits,
                                 total_cost[k] / costs[base], float(total_cost[k]), int(total_correct[k]))
                nxt.append(cand)
        found += nxt
        frontier = sorted(nxt, key=lambda c: c.rel_cost)[:8]
        if not frontier:
            break
    return found


def select(zoo: Zoo, base: str, cfg: SelectorConfig | None = None, savers: Sequence[str] | None = None,
           top: int = 5) -> tuple[Selection, pd.DataFrame]:
    """Best cascade for ``base`` and a table of the next best candidates (calibration split).

    ``savers`` limits the candidates (default: every cheaper measured model of the zoo).
    """
    cfg = cfg or SelectorConfig()
    entry = zoo.model(base)
    if entry.get("status") != "measured":
        raise SelectionError(f"{base!r} is {entry.get('status')} in zoo {zoo.name!r}: it has no predictions to select on")
    costs = {m: model_cost(zoo, m, cfg.cost) for m in zoo.measured()}
    ncls = entry.get("num_classes")
    if savers is not None:
        for s in savers:
            se = zoo.model(s)
            if se.get("status") != "measured":
                raise SelectionError(f"saver {s!r} has no predictions in zoo {zoo.name!r}")
            if se.get("num_classes") != ncls:
                raise SelectionError(f"saver {s!r} predicts {se.get('num_classes')} classes but base {base!r} "
                                     f"predicts {ncls}: their class spaces differ")
            if s == base:
                raise SelectionError("a model cannot be its own saver")
        pool = list(savers)
    else:
        pool = [m for m in zoo.measured() if m != base and costs[m] < costs[base]
                and zoo.models[m].get("num_classes") == ncls]
    calib, test = calibration_and_test(zoo, [base, *pool], cfg.calib_split, cfg.test_split, cfg.seed)
    return _select_on(zoo.name, base, pool, costs, calib, test, cfg, top)


def _select_on(zoo_name: str, base: str, pool: Sequence[str], costs: dict[str, float], calib: SplitData,
               test: SplitData | None, cfg: SelectorConfig, top: int = 5,
               orders: dict[str, SaverOrder] | None = None) -> tuple[Selection, pd.DataFrame]:
    cands = [c for c in _pair_candidates(base, pool, calib, costs, cfg, orders)]
    if cfg.max_stages > 2:
        best2 = min((c.rel_cost for c in cands if c.exits[0] > 0), default=np.inf)
        chains = [c for c in _chain_candidates(base, pool, calib, costs, cfg, cands) if c.rel_cost < best2 - 1e-12]
        cands += chains
    useful = sorted((c for c in cands if c.exits[0] > 0 and c.rel_cost < 1.0), key=lambda c: (c.rel_cost, -c.correct))
    target_kind = "base-agreement" if cfg.label_free else "labels"
    n = len(calib.labels)
    base_acc = float((calib.pred[base] == _targets(calib, base, cfg.label_free)).mean())
    common = dict(zoo=zoo_name, base=base, criterion=cfg.criterion, tolerance=cfg.tolerance,
                  delta=cfg.delta if cfg.criterion == "guaranteed" else None, cost_metric=cfg.cost,
                  target=target_kind, calib_split=calib.name, test_split=test.name if test else None,
                  cost_base=costs[base], acc_base_calib=base_acc)
    if not useful:
        why = "no cheaper model in the zoo" if not pool else f"no saver meets the {cfg.criterion} criterion"
        sel = Selection(stages=[Stage(base, None)], cost_cascade=costs[base], exit_ratio_calib=[1.0],
                        acc_cascade_calib=base_acc, message=f"no saver: run the base alone ({why})", **common)
        _fill_test(sel, test, cfg)
        return sel, pd.DataFrame()
    rows = []
    for c in useful[:top]:
        stages = [Stage(m, t) for m, t in c.savers] + [Stage(base, None)]
        s = Selection(stages=stages, cost_cascade=c.cost, exit_ratio_calib=[], acc_cascade_calib=c.correct / n,
                      **common)
        _, s.exit_ratio_calib = _cascade_outcome(calib, stages, _targets(calib, base, cfg.label_free))
        _fill_test(s, test, cfg)
        rows.append(s)
    return rows[0], pd.DataFrame([r.summary_row() for r in rows])


def _fill_test(sel: Selection, test: SplitData | None, cfg: SelectorConfig) -> None:
    if test is None:
        return
    target = _targets(test, sel.base, cfg.label_free)
    answer, ratios = _cascade_outcome(test, sel.stages, target)
    sel.acc_base_test = float((test.pred[sel.base] == target).mean())
    sel.acc_cascade_test = float((answer == target).mean())
    sel.exit_ratio_test = ratios


def select_all(zoo: Zoo, cfg: SelectorConfig | None = None) -> tuple[list[Selection], pd.DataFrame]:
    """Whole-zoo selection, one row per base (like Table 5 of the paper).

    Each saver's confidences are sorted once and reused for every base.
    """
    cfg = cfg or SelectorConfig()
    models = zoo.measured()
    if not models:
        raise SelectionError(f"zoo {zoo.name!r} has no measured models")
    costs = {m: model_cost(zoo, m, cfg.cost) for m in models}
    calib, test = calibration_and_test(zoo, models, cfg.calib_split, cfg.test_split, cfg.seed)
    return select_all_arrays(zoo.name, models, costs, {m: zoo.models[m].get("num_classes") for m in models},
                             calib, test, cfg)


def select_all_arrays(zoo_name: str, models: Sequence[str], costs: dict[str, float], num_classes: dict[str, Any],
                      calib: SplitData, test: SplitData | None, cfg: SelectorConfig) -> tuple[list[Selection], pd.DataFrame]:
    orders = None
    if not cfg.label_free:
        orders = {m: SaverOrder.build(calib.conf[m], calib.pred[m] == calib.labels) for m in models}
    sels = []
    for base in sorted(models, key=lambda m: costs[m]):
        pool = [m for m in models if costs[m] < costs[base] and num_classes[m] == num_classes[base]]
        sel, _ = _select_on(zoo_name, base, pool, costs, calib, test, cfg, top=1, orders=orders)
        sels.append(sel)
    return sels, pd.DataFrame([s.summary_row() for s in sels])


__all__ = ["SelectorConfig", "Selection", "Stage", "select", "select_all", "SaverOrder", "feasible_exits",
           "CRITERIA", "SelectionError", "ZooError"]
