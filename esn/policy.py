"""Exit thresholds for saver + ESN exits, and dynamic inference that really skips compute.

Exits in running order: 0 = the saver, n = ESN exit after base stage n (1..N), and the base's own
head last. Thresholds are chosen on a calibration split no ESN training saw. For zero/bounded, one
exit at a time with the selector's exact sweep: among the samples still open, exit n takes the
largest set that meets the criterion against the base on those samples. For guaranteed, by
Learn-then-Test along one shared-threshold path (`choose_policy`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinysaver.criteria import DEFAULT_CRITERION, GUARANTEE_GRID, get_criterion
from tinysaver.policy import answers, apply, exits
from tinysaver.splits import check_calibration
from tinysaver.sweep import SaverOrder, best_exit, criterion_passes

from .model import ExitSequenceNetwork
from .pair import Pair
from .staged import StagedModel
from .train import esn_splits, frozen_features


@dataclass
class ExitPolicy:
    thresholds: list[float]  # one per running-order exit (for the ESN: the saver, then exits 1..N); ``inf`` disables one
    temperatures: list[float] | None = None  # one per exit and the base head; None = 1 (uncalibrated)

    def apply(self, preds: np.ndarray, confs: np.ndarray, base_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offline: (exits, B) predictions/confidences → answer and exit index (len(thresholds) = base)."""
        where = apply(confs, self.thresholds)
        return answers(np.concatenate([preds, base_pred[None]]), where), where


def choose_policy(preds: np.ndarray, confs: np.ndarray, base_pred: np.ndarray, labels: np.ndarray,
                  criterion: str = DEFAULT_CRITERION, tolerance: float = 0.0, delta: float = 0.1,
                  saver_threshold: float | None = None, method: str = "wsr") -> ExitPolicy:
    """Exit thresholds from calibration outputs: (exits, B) ``preds``/``confs`` in running order.

    ``zero``/``bounded``: the selector's exact sweep, exit by exit, on the samples still open; the
    tolerance (points of the whole split) is spent first come, first served.

    ``guaranteed``: Learn-then-Test along one path fixed before the data are seen, as the
    risk-controlled early-exit literature does (Jazbec et al., "Fast yet Safe", NeurIPS 2024): every
    exit shares one threshold λ, walked down the selector's guarantee grid. Each λ's loss against
    the base over the whole cascade is tested in fixed sequence at the full δ (``method``: wsr or
    clopper-pearson), stopping at the first failure, and the lowest passing λ is kept. Then
    P(expected loss on new samples > ε) ≤ δ, assuming exchangeable samples. ``saver_threshold``
    fixes exit 0; the path then runs over the other exits.
    """
    if get_criterion(criterion).guarantee:
        return _guaranteed_path(preds, confs, base_pred, labels, tolerance, delta, saver_threshold, method)
    n_exits, n = preds.shape
    open_ = np.ones(n, bool)
    base_ok = base_pred == labels
    thresholds = []
    lost = 0.0  # accuracy points lost so far (calibration)
    for i in range(n_exits):
        idx = np.flatnonzero(open_)
        if i == 0 and saver_threshold is not None:
            t = float(saver_threshold)
        elif len(idx) == 0:
            t = float("inf")
        else:
            ok = preds[i][idx] == labels[idx]
            so = SaverOrder.build(confs[i][idx], ok)
            tol = max(tolerance - lost, 0.0) * n / len(idx)
            _, t = best_exit(so, base_ok[idx], criterion, tol, delta)
        take = open_ & exits(confs[i], t)
        lost += 100.0 * ((base_ok[take].sum() - (preds[i][take] == labels[take]).sum()) / n)
        thresholds.append(t)
        open_ &= ~take
    return ExitPolicy(thresholds)


def _guaranteed_path(preds, confs, base_pred, labels, tolerance, delta, saver_threshold, method) -> ExitPolicy:
    n_exits, n = preds.shape
    lam = np.concatenate([[np.inf], GUARANTEE_GRID])  # candidate 0: nothing exits (always passes)
    base_ok = (base_pred == labels).astype(np.int8)
    ok = np.concatenate([preds == labels[None], base_ok[None].astype(bool)]).astype(np.int8)
    cols = np.arange(n)[None, :]

    def path(j: int) -> list[float]:
        t = [float(lam[j])] * n_exits
        if saver_threshold is not None and n_exits:
            t[0] = float(saver_threshold)
        return t

    def outcomes(rows):
        where = np.stack([apply(confs, path(j)) for j in rows])
        loss = base_ok[None, :] - ok[where, cols]  # +1 harm, −1 repair
        return (loss == 1).sum(1), (loss == -1).sum(1), lambda: loss

    passing = criterion_passes("guaranteed", outcomes, len(lam), n, tolerance, delta, method)
    return ExitPolicy(path(int(np.flatnonzero(passing)[-1])))


def calibrated_policy(zoo, pair, method, criterion: str = DEFAULT_CRITERION, tolerance: float = 0.0, delta: float = 0.1,
                      calibrate: str | None = None, split=None) -> ExitPolicy:
    """The exit policy to run ``method`` with: thresholds (and, with ``calibrate='temperature'``,
    temperatures) chosen on the zoo's calibration split (``split`` overrides it), as ``esn eval`` does."""
    from .exits import fit_temperatures, offline_outputs

    check_calibration(calibrate)
    ds = split if split is not None else esn_splits(zoo, train=False)[1]
    feats = frozen_features(pair, ds.images)
    temps = fit_temperatures(method, feats, ds.labels) if calibrate else None
    cal = offline_outputs(method, feats, ds.labels, temps)
    policy = choose_policy(cal["preds"], cal["confs"], cal["base_pred"], cal["labels"], criterion, tolerance, delta)
    return ExitPolicy(policy.thresholds, temps)


def offline_exit_outputs(esn: ExitSequenceNetwork, feats: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """All exits on cached features: (1 + N, B) predictions and confidences (row 0 = saver)."""
    from .exits import offline_outputs

    out = offline_outputs(esn, feats, np.full(len(feats["base_logits"]), -1))
    return out["preds"], out["confs"]


def dynamic_predict(saver, base, base_staged: StagedModel, esn: ExitSequenceNetwork, policy: ExitPolicy,
                    images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Saver first; then base stage by stage on the still-open samples only, evaluating the ESN exit
    after each stage; the base head answers the rest. Returns (answer, exit index) in input order."""
    from .exits import dynamic_predict as run

    return run(Pair.of(saver, base, base_staged), esn, policy, images, batch_size)


__all__ = ["ExitPolicy", "choose_policy", "calibrated_policy", "offline_exit_outputs", "dynamic_predict"]
