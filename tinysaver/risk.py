"""Upper confidence bounds on a cascade's accuracy loss against its base, for the guaranteed criterion.

Per sample, the loss of answering early instead of with the base is ℓ = harm − repair ∈ {−1, 0, 1}:
harm = 1 when the base was right and the cascade is wrong, repair = 1 for the reverse. The
expected loss L = E[ℓ] is what a user gives up in accuracy (fraction, not points).

A method here answers "is L ≤ ε?" at level δ for one fixed policy: it returns True only when the
calibration sample makes L > ε implausible. `fixed_sequence` strings such tests along a
sequence fixed before the data are seen (Learn-then-Test, Angelopoulos et al. 2021): the sequence
stops at its first failure and every policy before it is certified, with family-wise error ≤ δ
and no multiplicity correction within the sequence.

Methods:

- ``clopper-pearson``: upper Clopper–Pearson limit on P(harm) minus lower limit on P(repair), each at δ/2.
- ``wsr``: a betting test (Waudby-Smith & Ramdas 2023, predictable plug-in bets) on
  x = (ℓ + 1)/2 ∈ [0, 1] against H0: E[x] ≥ (ε + 1)/2. It adapts to the small variance of ℓ, so it
  certifies more exits when few samples change their answer. Samples are visited in a seeded order.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError

METHODS = ("clopper-pearson", "wsr")


def check_delta(delta: float, error: type[Exception] = UsageError) -> None:
    """δ, the probability a guarantee may fail, lies in (0, 1): raise ``error`` naming it otherwise."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise error(f"δ must be in (0, 1), got {delta}")


def clopper_pearson(k: np.ndarray, n: int, alpha: float, upper: bool) -> np.ndarray:
    """One-sided Clopper–Pearson limit of a binomial rate with ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    if upper:
        return np.where(k >= n, 1.0, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)))
    return np.where(k <= 0, 0.0, beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1))


def loss_upper_bound(harm: np.ndarray, repair: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Upper (1 − δ) bound on L = P(harm) − P(repair), a fraction: Clopper–Pearson on each count at δ/2.

    Valid for a policy fixed before the ``n`` samples were seen."""
    return clopper_pearson(harm, n, delta / 2, upper=True) - clopper_pearson(repair, n, delta / 2, upper=False)


def passes_clopper_pearson(harm: np.ndarray, repair: np.ndarray, n: int, epsilon: float, delta: float) -> np.ndarray:
    """Per policy: True when the upper bound on L = P(harm) − P(repair) is ≤ ``epsilon`` (fraction)."""
    return loss_upper_bound(harm, repair, n, delta) <= epsilon


def passes_wsr(losses: np.ndarray, epsilon: float, delta: float, seed: int = 0) -> np.ndarray:
    """Per policy (rows of ``losses``, (P, N) with values in {−1, 0, 1}): True when the betting
    capital against L ≥ ``epsilon`` reaches 1/δ at some point of the seeded sample order."""
    losses = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    p, n = losses.shape
    if n == 0:
        return np.zeros(p, dtype=bool)
    order = np.random.default_rng(seed).permutation(n)
    x = (losses[:, order] + 1.0) / 2.0
    m = (epsilon + 1.0) / 2.0
    if m >= 1.0:
        return np.ones(p, dtype=bool)
    # predictable variance estimate (WSR eq. 26-27), from the samples before i; the bet's sign is
    # fixed by the one-sided null, its size shrinks where the loss varies more
    i = np.arange(1, n + 1, dtype=np.float64)
    csum = np.cumsum(x, axis=1)
    sq = np.cumsum((x - (0.5 + csum) / (i + 1)) ** 2, axis=1)
    var_prev = (0.25 + np.concatenate([np.zeros((p, 1)), sq[:, :-1]], axis=1)) / i
    lam = np.minimum(np.sqrt(2 * np.log(1 / delta) / (n * var_prev)), 0.75 / (1 - m))  # factor stays ≥ 0.25
    log_capital = np.cumsum(np.log1p(lam * (m - x)), axis=1)
    return log_capital.max(axis=1) >= np.log(1 / delta)


def fixed_sequence(passes: np.ndarray) -> np.ndarray:
    """Policies certified by fixed-sequence testing: all those before the first failure."""
    passes = np.asarray(passes, dtype=bool)
    fail = np.flatnonzero(~passes)
    out = passes.copy()
    if len(fail):
        out[fail[0]:] = False
    return out


__all__ = ["METHODS", "check_delta", "clopper_pearson", "passes_clopper_pearson", "passes_wsr", "fixed_sequence"]
