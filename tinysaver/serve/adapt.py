"""``--adapt``: the live audit, plus a saver threshold that retunes itself within the bound.

The service starts at the calibrated threshold t₀ and watches it with an `AuditMonitor`.

- **Drift raises the threshold.** When the monitor of the threshold in use says ``drift``, the
  audited early answers of that threshold's epoch choose a higher one: the lowest point t of
  `ADAPT_GRID` (or ∞, the base alone) whose estimated loss, (1/a) · (audited answers with
  confidence ≥ t that disagreed with the base) / (requests of the epoch), is at most half the
  tolerance. Nothing is claimed for it yet: it starts a new epoch with a fresh monitor, whose state
  is ``uncertain`` until its own audits decide.
- **Only fresh audits lower it.** Each epoch also runs a *shadow* monitor for every candidate below
  the threshold in use: t₀, the grid points between, and two grid points under t₀. They see only
  requests that arrive after the epoch began, never those that chose its threshold. For a
  candidate c a request counts as a hit exactly as it would for the monitor of c itself: it would
  have exited (saver confidence ≥ c), it was audited with probability a, and the saver's class
  differs from the base's. A request the threshold in use sent to the base has its base answer
  already, so its "audit" is a coin of probability a. Each shadow is a confidence sequence at
  δ / (number of candidates), so the chance that any candidate of the epoch is certified wrongly is
  at most δ. The lowest certified candidate becomes the threshold, and a new epoch begins.

Each epoch spends δ afresh: over many changes, the chance that one of them was wrong grows with
their number; ``/healthz`` lists them. The adapter handles a saver → base pair (one threshold),
because a shadow candidate must know the saver's class for requests the base answered, and for a
longer chain the later savers' answers are unknown when an earlier one exits.

A plain class with no Ray in it, like the monitor: the service feeds it, and
``benchmarks/bench_audit.py`` replays stored predictions through it.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Callable

from ..errors import ServeError
from ..policy import confident
from .audit import AuditMonitor

log = logging.getLogger("tinysaver.serve")

# coarse on purpose: every candidate below the threshold in use costs its shadow a share of δ
ADAPT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
LOWER_STEPS = 2  # grid points under the calibrated threshold that an epoch may certify


class ThresholdAdapter:
    """``request(early, audit, saver_pred, saver_conf, base_pred)`` records an answered request and
    returns its record (``base_pred``: known when the base answered it, else None); ``audited(record,
    disagreed)`` and ``dropped(record)`` settle an audit. ``threshold`` is the one in use; ``state``
    and ``view()`` are the monitor's of the current epoch, with the adapter's own fields added."""

    def __init__(self, calibrated: float, fraction: float, delta: float, tolerance_points: float,
                 grid: tuple[float, ...] = ADAPT_GRID, seed: int = 0):
        if not fraction > 0:
            raise ServeError("--adapt needs audits: give --audit a fraction > 0")
        self.calibrated = self.threshold = float(calibrated)
        self.fraction, self.delta, self.tolerance = float(fraction), float(delta), float(tolerance_points)
        self.grid = tuple(sorted(set(map(float, grid))))
        self.rng = random.Random(seed)
        self.requests = 0
        self.switches: list[dict] = []  # each change: request, from, to, why
        self._epoch()

    # --- epochs -----------------------------------------------------------------------------
    def candidates_below(self, t: float) -> list[float]:
        """The thresholds an epoch at ``t`` may lower to, highest first."""
        under = [g for g in self.grid if g < self.calibrated][-LOWER_STEPS:]
        return sorted({c for c in (*self.grid, self.calibrated) if c < t and (c >= self.calibrated or c in under)},
                      reverse=True)

    def _epoch(self) -> None:
        self.epoch = len(self.switches)
        self.monitor = AuditMonitor(self.fraction, self.delta, self.tolerance)
        below = self.candidates_below(self.threshold)
        self.shadows = {c: AuditMonitor(self.fraction, self.delta / len(below), self.tolerance, quiet=True)
                        for c in below}
        self.window: list[tuple[float, bool]] = []  # (saver confidence, disagreed) of this epoch's audits

    def _switch(self, to: float, why: str) -> None:
        self.switches.append({"request": self.requests, "from": _json(self.threshold), "to": _json(to), "why": why})
        log.warning("tinysaver: adapt: threshold %s → %s after %d requests (%s)", _json(self.threshold), _json(to),
                    self.requests, why)
        self.threshold = to
        self._epoch()

    # --- feeding -----------------------------------------------------------------------------
    def request(self, early: bool, audit: bool, saver_pred: int, saver_conf: float, base_pred: int | None) -> list:
        self.requests += 1
        rec = self.monitor.request(early, audit)
        shadow_recs = {}
        for c, m in self.shadows.items():
            if not confident(saver_conf, c):
                m.request(False)
            elif early:  # exited at the threshold in use: its audit is the monitor's own
                shadow_recs[c] = m.request(True, audit)
            elif self.rng.random() < self.fraction:  # the base answered: audit it with a coin
                m.audited(m.request(True, audit=True), saver_pred != base_pred)
            else:
                m.request(True)
        record = [self.epoch, rec, shadow_recs, float(saver_conf)]
        if not audit:
            self._after()
        return record

    def audited(self, record: list, disagreed: bool) -> None:
        epoch, rec, shadow_recs, conf = record
        if epoch != self.epoch:
            return  # its epoch is over: the new monitors never saw this request
        self.monitor.audited(rec, disagreed)
        for c, r in shadow_recs.items():
            self.shadows[c].audited(r, disagreed)
        self.window.append((conf, bool(disagreed)))
        self._after()

    def dropped(self, record: list) -> None:
        epoch, _, shadow_recs, _ = record
        if epoch != self.epoch:
            return
        self.monitor.dropped()
        for c in shadow_recs:
            self.shadows[c].dropped()

    def _after(self) -> None:
        if self.monitor.state == "drift" and math.isfinite(self.threshold):
            self._switch(self._raised(), "drift")
            return
        certified = [c for c, m in self.shadows.items() if m.state == "certified"]
        if certified:
            self._switch(min(certified), "certified by fresh audits")

    def _raised(self) -> float:
        """The lowest grid point above the threshold in use whose loss, estimated from this epoch's
        audits, is at most half the tolerance; ∞ (the base alone) if none."""
        n = max(self.monitor.n, 1)
        for t in (g for g in self.grid if g > self.threshold):
            loss = 100 * sum(d for c, d in self.window if confident(c, t)) / self.fraction / n
            if loss <= self.tolerance / 2:
                return t
        return math.inf

    # --- reading -----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.monitor.state

    @property
    def alarm(self) -> bool:
        return self.monitor.alarm

    def view(self) -> dict:
        return {**self.monitor.view(), "adapt": {
            "threshold": _json(self.threshold), "calibrated": self.calibrated, "epoch": self.epoch,
            "epoch_requests": self.monitor.requests, "switch_count": len(self.switches),
            "switches": self.switches[-20:],
            "candidates": {str(c): m.state for c, m in self.shadows.items()}}}


def replay(adapter: ThresholdAdapter, saver_pred: int, saver_conf: float, base_pred: int,
           coin: Callable[[], float]) -> bool:
    """One request replayed offline, as the service answers it: it exits when the saver's confidence
    reaches the threshold in use, and an early answer is audited when ``coin()`` (uniform in
    [0, 1), drawn for early answers only, as the service draws it) falls under the audit fraction;
    the audit returns at once. Returns whether it exited."""
    early = confident(saver_conf, adapter.threshold)
    audit = early and coin() < adapter.fraction
    record = adapter.request(early, audit, saver_pred, saver_conf, None if early else base_pred)
    if audit:
        adapter.audited(record, saver_pred != base_pred)
    return early


def _json(t: float) -> float | None:
    return float(t) if math.isfinite(t) else None  # JSON has no inf


__all__ = ["ADAPT_GRID", "ThresholdAdapter", "replay"]
