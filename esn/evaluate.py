"""Costs of each exit and budget curves: accuracy at 25/50/75/100 % of the base's FLOPs.

Per-sample cost when leaving at exit e (0 = saver, 1..N = ESN exits, N + 1 = base head):
saver + [stem + stages 1..e + the ESN work of exits 1..e] (+ the base tail for the base head).
The ESN work of exit n is one embedding and one bus pass over n + 1 tokens, as in dynamic inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinysaver.criteria import DEFAULT_CRITERION
from tinysaver.policy import answers, apply
from tinysaver.sweep import SaverOrder, best_exit

from .exits import exit_flops
from .model import ExitSequenceNetwork
from .pair import Pair
from .policy import ExitPolicy, choose_policy, dynamic_predict, offline_exit_outputs
from .staged import StagedModel
from .train import esn_splits, frozen_features


@dataclass
class ExitCosts:
    """FLOPs per image of the saver, the whole base, leaving at each exit, and the ESN's own work."""

    saver: float
    base_total: float
    per_exit_flops: np.ndarray  # leaving at exit 0 (saver), 1..N (ESN exits), N + 1 (base head)
    overhead: float             # ESN work up to its last exit

    def per_exit(self) -> np.ndarray:
        return self.per_exit_flops

    @property
    def esn_overhead_pct(self) -> float:
        return 100.0 * self.overhead / self.base_total


def exit_costs(saver, base, base_staged: StagedModel, esn: ExitSequenceNetwork) -> ExitCosts:
    """Counted once, by `esn.exits.exit_flops`, for every exit method alike."""
    f = exit_flops(Pair.of(saver, base, base_staged), esn)
    return ExitCosts(f["saver"], f["base_total"], f["per_exit"], f["overhead"])


def saver_cascade(d: dict, threshold: float, costs: ExitCosts) -> tuple[np.ndarray, float]:
    """The plain saver → base cascade on ``d`` (``preds``/``confs`` row 0 = saver, ``base_pred``):
    answers (B,) and mean cost per image as a fraction of the base's FLOPs."""
    where = apply(d["confs"][:1], [threshold])
    ans = answers(np.stack([d["preds"][0], d["base_pred"]]), where)
    return ans, float((costs.saver + where.mean() * costs.base_total) / costs.base_total)


def budget_table(calib: dict, test: dict, costs: ExitCosts, budgets=(0.25, 0.5, 0.75, 1.0)) -> list[dict]:
    """For each budget (fraction of base FLOPs) and setting, pick thresholds on calib (best accuracy
    with calib cost ≤ budget) and report test accuracy and test cost.

    ``calib``/``test`` hold ``preds``/``confs`` ((1 + N, B), row 0 = saver), ``base_pred`` and ``labels``.
    """
    per_exit = costs.per_exit()
    n_exits = calib["preds"].shape[0]
    grid = np.unique(np.quantile(calib["confs"][0], np.linspace(0, 1, 41)))
    grid = np.concatenate([grid, [np.inf]])

    def evaluate(d, thresholds, use_esn):
        if use_esn:
            pol = ExitPolicy(list(thresholds))
            ans, where = pol.apply(d["preds"], d["confs"], d["base_pred"])
            cost = per_exit[where].mean()
            return float((ans == d["labels"]).mean()), float(cost / costs.base_total)
        ans, frac = saver_cascade(d, thresholds[0], costs)
        return float((ans == d["labels"]).mean()), frac

    # each setting: whether it runs the ESN's exits, and its candidate policies
    cascade, with_esn = [], []
    candidates = {"saver cascade": (False, cascade), "saver + ESN": (True, with_esn)}
    for t in grid:
        cascade.append([t])
        for t_esn in grid[::2]:
            with_esn.append([t] + [t_esn] * (n_exits - 1))
    for tol in (0.0, 0.5, 1.0, 2.0, 4.0):  # the selector-style policies too
        with_esn.append(choose_policy(calib["preds"], calib["confs"], calib["base_pred"],
                                                       calib["labels"], "bounded", tol).thresholds)
    rows = []
    base_acc = float((test["base_pred"] == test["labels"]).mean())
    for b in budgets:
        row = {"budget": f"{int(100 * b)}%", "base alone": f"{100 * base_acc:.2f}" if b >= 1.0 else "—"}
        for name, (use_esn, cands) in candidates.items():
            best = None
            for th in cands:
                acc_c, cost_c = evaluate(calib, th, use_esn)
                if cost_c <= b + 1e-9 and (best is None or acc_c > best[0]):
                    best = (acc_c, th)
            if best is None:
                row[name] = "—"
            else:
                acc_t, cost_t = evaluate(test, best[1], use_esn)
                row[name] = f"{100 * acc_t:.2f} @ {100 * cost_t:.0f}%"
        rows.append(row)
    return rows


def evaluate_checkpoint(zoo, pair, esn, criterion=DEFAULT_CRITERION, tolerance=0.0, dynamic_check: int = 256, log=print,
                        splits=None, features=None, limit: int | None = None):
    """Policy on calib, results on test, budget table and a dynamic-vs-offline exactness check.

    ``splits`` (train, calib, test) and ``features`` ({'calib': ..., 'test': ...} from
    `esn.train.frozen_features`) may be passed in to avoid recomputing them; ``limit``: the first
    N images of calib and of test only (a quick look). Train is never decoded here.
    """
    _, calib, test = splits or esn_splits(zoo, limit=limit, train=False)
    out = {}
    for name, ds in (("calib", calib), ("test", test)):
        f = features[name] if features else frozen_features(pair, ds.images, desc=f"esn eval: {name} features")
        p, c = offline_exit_outputs(esn, f)
        out[name] = {"preds": p, "confs": c, "base_pred": f["base_logits"].argmax(-1).numpy(), "labels": ds.labels}
    cal, tst = out["calib"], out["test"]
    costs = exit_costs(pair.saver, pair.base, pair.base_staged, esn)
    per_exit = costs.per_exit()
    policy = choose_policy(cal["preds"], cal["confs"], cal["base_pred"], cal["labels"], criterion, tolerance)
    ans, where = policy.apply(tst["preds"], tst["confs"], tst["base_pred"])
    # the plain saver cascade under the same criterion, for comparison
    so = SaverOrder.build(cal["confs"][0], cal["preds"][0] == cal["labels"])
    _, t = best_exit(so, cal["base_pred"] == cal["labels"], criterion, tolerance, 0.1)
    casc, casc_cost = saver_cascade(tst, t, costs)
    exit_acc = [(p == tst["labels"]).mean() for p in tst["preds"]]
    summary = {
        "base_acc": float((tst["base_pred"] == tst["labels"]).mean()),
        "cascade_acc": float((casc == tst["labels"]).mean()), "cascade_cost": float(casc_cost),
        "esn_acc": float((ans == tst["labels"]).mean()), "esn_cost": float(per_exit[where].mean() / costs.base_total),
        "esn_overhead_pct": costs.esn_overhead_pct, "esn_params": sum(p.numel() for p in esn.parameters()),
        "exit_accuracy": [float(a) for a in exit_acc], "policy": policy.thresholds,
        "exit_share": [float((where == i).mean()) for i in range(len(per_exit))],
    }
    log(f"test accuracy per exit (0 = saver): {', '.join(f'{100 * a:.2f}' for a in exit_acc)}")
    log(f"policy ({criterion}) thresholds: {', '.join(f'{t:.4f}' for t in policy.thresholds)}")
    log(f"share answered per exit (last = base head): {', '.join(f'{100 * s:.1f}%' for s in summary['exit_share'])}")
    log(f"base alone:     {100 * summary['base_acc']:.2f}% at 100% FLOPs")
    log(f"saver cascade:  {100 * summary['cascade_acc']:.2f}% at {100 * casc_cost:.1f}% FLOPs")
    log(f"saver + ESN:    {100 * summary['esn_acc']:.2f}% at {100 * summary['esn_cost']:.1f}% FLOPs "
        f"(ESN overhead {costs.esn_overhead_pct:.2f}% of base FLOPs, {summary['esn_params']} params)")
    rows = budget_table(cal, tst, costs)
    summary["budget"] = rows
    log("| budget | base alone | saver cascade | saver + ESN |\n|---|---|---|---|")
    for r in rows:
        log(f"| {r['budget']} | {r['base alone']} | {r['saver cascade']} | {r['saver + ESN']} |")
    if dynamic_check:
        imgs = test.images[:dynamic_check]
        dyn, dwhere = dynamic_predict(pair.saver, pair.base, pair.base_staged, esn, policy, imgs, batch_size=64)
        ref_ans, ref_where = policy.apply(tst["preds"][:, :dynamic_check], tst["confs"][:, :dynamic_check],
                                          tst["base_pred"][:dynamic_check])
        same = float(((dyn == ref_ans) & (dwhere == ref_where)).mean())
        summary["dynamic_match"] = same
        log(f"dynamic inference vs offline policy on {len(imgs)} test images: {100 * same:.1f}% identical")
    return summary


__all__ = ["ExitCosts", "exit_costs", "saver_cascade", "budget_table", "evaluate_checkpoint"]
