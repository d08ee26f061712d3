"""The live audit: a label-free bound on the accuracy the cascade gives up against its base.

A fraction of the early answers is also run through the base after the answer has gone out. Over
the last ``window`` requests, with E early exits of which m were audited and k disagreed with the
base, the loss against the base is at most (E / W) · CP⁺(k, m, δ) (Clopper–Pearson). The monitor
is a plain class with no Ray in it: the service feeds it, and it can be replayed offline on stored
predictions.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Sequence

import numpy as np

log = logging.getLogger("tinysaver.serve")


def loss_bound(records: Sequence[tuple[bool, bool | None]], delta: float) -> float | None:
    """Upper bound (fraction) on the accuracy the cascade gives up against the base over ``records``:
    one (exited early, disagreed with the base, or None when not audited) per request.

    (E / W) · CP⁺(k, m, δ) with W requests, E early exits, m of them audited and k disagreeing.
    Few audits give a wide bound; with none it is E / W, as if every early answer were wrong.
    """
    from ..risk import clopper_pearson

    w = len(records)
    if w == 0:
        return None
    exited = [d for e, d in records if e]
    audited = [d for d in exited if d is not None]
    if not exited:
        return 0.0
    if not audited:
        return len(exited) / w
    k = int(sum(audited))
    return len(exited) / w * float(clopper_pearson(np.array([k]), len(audited), delta, upper=True)[0])


class AuditMonitor:
    """Requests in, state out. ``request(early)`` records one answered request and returns its
    record; ``audited(record, disagreed)`` adds the base's verdict on an early answer;
    ``dropped()`` counts an audit given up (an overloaded base). ``view()`` is what /healthz shows."""

    def __init__(self, fraction: float, delta: float, tolerance_points: float, window: int):
        self.fraction, self.delta, self.tolerance = fraction, delta, tolerance_points
        self.window: deque = deque(maxlen=window)
        self.audited_n = self.dropped_n = self.disagreements = 0
        self.alarm, self.bound = False, None

    def request(self, early: bool) -> list:
        record = [early, None]
        self.window.append(record)
        return record

    def audited(self, record: list, disagreed: bool) -> None:
        record[1] = bool(disagreed)
        self.audited_n += 1
        self.disagreements += int(disagreed)
        self._update()

    def dropped(self) -> None:
        self.dropped_n += 1

    def _update(self) -> None:
        full = len(self.window) == self.window.maxlen  # no alarm from the first few requests
        self.bound = loss_bound([tuple(r) for r in self.window], self.delta)
        alarm = bool(full and self.bound is not None and 100 * self.bound > self.tolerance)
        if alarm and not self.alarm:
            log.warning("tinysaver: the audit bounds the accuracy given up at %.2f points (δ=%g), above the "
                        "tolerance of %.2f: the traffic has drifted from the calibration data",
                        100 * self.bound, self.delta, self.tolerance)
        self.alarm = alarm

    @property
    def status(self) -> str:
        return "drift" if self.alarm else "ok"

    def view(self) -> dict:
        return {"fraction": self.fraction, "audited": self.audited_n, "dropped": self.dropped_n,
                "disagreements": self.disagreements, "window_requests": len(self.window),
                "loss_bound_points": None if self.bound is None else round(100 * self.bound, 4),
                "tolerance_points": self.tolerance, "delta": self.delta, "alarm": self.alarm}


__all__ = ["AuditMonitor", "loss_bound"]
