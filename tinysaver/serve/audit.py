"""The live audit: an anytime-valid, label-free bound on the accuracy the cascade gives up against
its base, and three states read from it.

Each early answer is also run through the base, after the answer has gone out, with probability
``a`` (``--audit``). For request i let X_i = 1 when it exited early, was audited, and the saver's
class differs from the base's. On exchangeable traffic the X_i are Bernoulli with mean p = a · L,
where L is the share of requests whose answer differs from the base's: an upper bound on the
accuracy given up against the base, and the quantity the selector certified offline.

The monitor keeps a **confidence sequence** for p: Robbins' beta-binomial mixture martingale
M_n(p) = B(α + S, β + n − S) / (B(α, β) · p^S (1 − p)^(n − S)) over n requests with S hits. By
Ville's inequality, P(M_n(p*) ≥ 1/δ for some n) ≤ δ, so the set {p : M_n(p) < 1/δ} holds p* at
every n at once with probability ≥ 1 − δ. It is checked after every request, and however long the
monitoring runs, the chance of a false ``drift`` stays ≤ δ: no correction for repeated looks is
needed. With U and Lo the set's ends divided by a, in accuracy points:

- ``certified``: U ≤ tolerance, the loss against the base is within the tolerance;
- ``drift``: Lo > tolerance, evidence that the loss itself exceeds the tolerance;
- ``uncertain``: neither yet. ``more_requests`` (and ``more_audits``) says how many more would
  certify the tolerance if the disagreement stayed at its current rate (None: it never would).

A plain class with no Ray in it: the service feeds it, and benchmarks replay stored predictions.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("tinysaver.serve")

STATES = ("off", "uncertain", "certified", "drift")
# Beta(1/2, 1/2) mixing: Jeffreys' prior, the usual choice for a Bernoulli mixture martingale
ALPHA = BETA = 0.5


def _log_mixture(s: float, n: float, p: float) -> float:
    """log M_n(p): the beta-binomial mixture against the point p, after s hits in n trials."""
    lg = math.lgamma
    log_b = lambda a, b: lg(a) + lg(b) - lg(a + b)  # noqa: E731
    return (log_b(ALPHA + s, BETA + n - s) - log_b(ALPHA, BETA)
            - (s * math.log(p) if s else 0.0) - ((n - s) * math.log1p(-p) if n - s else 0.0))


def confidence_sequence(s: float, n: float, delta: float) -> tuple[float, float]:
    """The ends (lo, hi) of {p : M_n(p) < 1/δ} after ``s`` hits in ``n`` trials (fractions)."""
    if n <= 0:
        return 0.0, 1.0
    level = math.log(1 / delta)
    mode = min(max(s / n, 1e-12), 1 - 1e-12)  # log M is convex in p with its least value near s/n

    def inside(p: float) -> bool:
        return _log_mixture(s, n, p) < level

    def edge(a: float, b: float) -> float:  # a inside, b outside: bisect to the boundary
        for _ in range(60):
            m = (a + b) / 2
            a, b = (m, b) if inside(m) else (a, m)
        return a

    lo = 0.0 if inside(1e-15) else edge(mode, 1e-15)
    hi = 1.0 if inside(1 - 1e-15) else edge(mode, 1 - 1e-15)
    return lo, hi


class AuditMonitor:
    """``request(early)`` records one answered request and returns its record; ``audited(record,
    disagreed)`` adds the base's verdict on an audited early answer; ``dropped()`` counts an
    audit given up (an overloaded base), which then counts as not audited. ``state`` is one of
    `STATES`; ``view()`` is what /healthz and /metrics show.

    A request counts in n once its outcome is known: at once when it was not audited, when its
    audit returns otherwise, so a slow base never makes the set narrower than the evidence.
    """

    def __init__(self, fraction: float, delta: float, tolerance_points: float, quiet: bool = False):
        self.fraction, self.delta, self.tolerance = float(fraction), float(delta), float(tolerance_points)
        self.n = self.hits = 0          # settled requests, and audited early answers that disagreed
        self.requests = self.early = 0  # answered requests, of which early
        self.audited_n = self.dropped_n = self.pending = 0
        self.state = "off" if self.fraction <= 0 else "uncertain"
        self.changes: list[tuple[int, str, str]] = []  # (request, from, to), in order
        self.quiet = quiet  # no log lines (the adapter's shadow monitors)

    def request(self, early: bool, audit: bool = False) -> list:
        """Record an answered request; ``audit``: its base answer is on its way (``audited``)."""
        self.requests += 1
        self.early += int(early)
        record = [early, None]
        if audit:
            self.pending += 1
        else:
            self._settle(0)
        return record

    def audited(self, record: list, disagreed: bool) -> None:
        record[1] = bool(disagreed)
        self.pending -= 1
        self.audited_n += 1
        self._settle(int(bool(disagreed)))

    def dropped(self, record: list | None = None) -> None:
        # no verdict: counted as not audited. The sequence stays valid while drops do not depend on
        # whether the saver and base disagree (an overloaded base drops whatever it is given);
        # they are reported, and a service that drops many should be read with care
        self.pending -= 1
        self.dropped_n += 1
        self._settle(0)

    def _settle(self, hit: int) -> None:
        self.n += 1
        self.hits += hit
        if self.fraction <= 0:
            return
        # The state needs one evaluation: the tolerance, as a hit rate, is outside the set exactly
        # when the mixture reaches 1/δ there, above the set (certified) or below it (drift).
        target = self.tolerance / 100 * self.fraction
        outside = target < 1 and _log_mixture(self.hits, self.n, target) >= math.log(1 / self.delta)
        state = ("certified" if target > self.hits / self.n else "drift") if outside else "uncertain"
        if state != self.state:
            self.changes.append((self.requests, self.state, state))
            if not self.quiet:
                lo, hi = self.bounds()
                log.log(logging.WARNING if state == "drift" else logging.INFO,
                        "tinysaver: audit %s → %s after %d requests: the loss against the base is in [%.2f, %.2f] "
                        "points (δ=%g), tolerance %.2f", self.state, state, self.requests, lo, hi, self.delta,
                        self.tolerance)
            self.state = state

    def bounds(self) -> tuple[float, float]:
        """(lower, upper) on the loss against the base, in accuracy points, valid at every time."""
        lo, hi = confidence_sequence(self.hits, self.n, self.delta)
        return 100 * lo / self.fraction, min(100.0, 100 * hi / self.fraction)

    def more_requests(self, cap: int = 10**8) -> int | None:
        """Requests still needed for ``certified`` if hits keep their current rate (None: never)."""
        if self.fraction <= 0 or self.state in ("certified", "drift"):
            return 0 if self.state == "certified" else None
        rate = self.hits / self.n if self.n else 0.0
        target = self.tolerance / 100 * self.fraction
        if rate >= target:
            return None

        def certifies(k: int) -> bool:
            return confidence_sequence(self.hits + rate * k, self.n + k, self.delta)[1] <= target

        hi = 1
        while not certifies(hi):
            hi *= 2
            if hi > cap:
                return None
        lo = hi // 2
        while hi - lo > max(1, hi // 100):  # to 1 %: it is an estimate
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if certifies(mid) else (mid, hi)
        return hi

    @property
    def alarm(self) -> bool:
        return self.state == "drift"

    def view(self) -> dict:
        more = self.more_requests()
        exit_ratio = self.early / self.requests if self.requests else None
        bounds = self.bounds() if self.fraction > 0 and self.n else None
        return {"state": self.state, "fraction": self.fraction, "delta": self.delta,
                "tolerance_points": self.tolerance, "requests": self.requests, "settled": self.n,
                "audited": self.audited_n, "dropped": self.dropped_n, "pending": self.pending,
                "disagreements": self.hits,
                "loss_points": None if bounds is None else {"lower": round(bounds[0], 4), "upper": round(bounds[1], 4)},
                "more_requests": more,
                "more_audits": None if more is None or exit_ratio is None else round(more * exit_ratio * self.fraction),
                "method": "beta-binomial mixture confidence sequence (anytime-valid)", "alarm": self.alarm}


__all__ = ["AuditMonitor", "STATES", "confidence_sequence"]
