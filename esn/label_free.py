"""Exits trained without labels (seed ``001_*``).

- **Distillation.** Exits learn the base's output distribution on unlabelled images (such as the
  traffic a model serves): the loss is KL(base ‖ exit), computed as cross-entropy to the base's
  probabilities (the KL plus the base's entropy, a constant). `soft_targets` is the only
  target a label-free run ever sees.
- **Temperature calibration** of each exit on a labelled validation split
  (`tinysaver.calibration.fit_temperature`).
- **Thresholds from a tolerance T.** Exit n (1-based) gets the lowest threshold whose expected
  accuracy drop, ``hit rate × (1 − agreement with the base)`` on the validation split, stays within
  ``T / 2^n`` percent: shallow exits get most of the budget. Label-free too: it counts
  disagreements with the base, never errors.
"""
from __future__ import annotations

import numpy as np
import torch

from tinysaver.policy import exits
from tinysaver.sweep import SaverOrder, best_exit
from tinysaver.errors import UsageError


def soft_targets(base_logits: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities of the base: the distillation target."""
    return base_logits.detach().float().softmax(-1)


def tolerance_thresholds(preds: np.ndarray, confs: np.ndarray, base_pred: np.ndarray, tolerance: float) -> list[float]:
    """One threshold per exit (E, B arrays in running order): exit n spends at most ``tolerance / 2^n``
    points of the whole split in disagreements with the base, among the samples still open there."""
    if not np.isfinite(tolerance) or tolerance < 0:
        raise UsageError(f"the tolerance T is in accuracy points and must be ≥ 0, got {tolerance}")
    n_exits, n = preds.shape
    open_ = np.ones(n, bool)
    out = []
    for i in range(n_exits):
        idx = np.flatnonzero(open_)
        if len(idx) == 0:
            out.append(float("inf"))
            continue
        agree = preds[i][idx] == base_pred[idx]
        budget = tolerance / 2 ** (i + 1) * n / len(idx)  # T/2^n points of the split, as points of the open part
        _, t = best_exit(SaverOrder.build(confs[i][idx], agree), np.ones(len(idx), bool), "bounded", budget)
        out.append(float(t))
        open_ &= ~exits(confs[i], t)
    return out


__all__ = ["soft_targets", "tolerance_thresholds"]
