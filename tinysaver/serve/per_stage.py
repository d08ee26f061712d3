"""The per-stage layout: each stage a deployment of its own, walked by the ingress.

``StageWalk`` asks the stage deployments in turn, one request at a time, retrying a stage whose
replica died while Serve replaces it, until the request's deadline. ``WalkAnswerer`` is what the
ingress asks, and owns the live thresholds as the fused layout's does. ``ItemStage`` is what a
stage's replica runs: one engine stage on the (image, carry) items its requests bring.
Plain asyncio, no Ray: the deployments give these classes their stage handles, and tests stand-ins.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from ..engine import carry_rows, carry_stack
from ..policy import exits
from .http import BadRequest
from .options import Answer, ServiceSpec

STATS_TIMEOUT_S = 2.0  # how long /metrics waits for one stage's counters


class StageWalk:
    """``call(i, item)`` starts stage i on one (image, carry) item and returns a Serve response
    (awaitable, with ``cancel()``); ``dead``: the exceptions that mean "replica gone, retry"."""

    def __init__(self, call: Callable[[int, tuple], Any], names: Sequence[str], thresholds: Sequence[float],
                 base_from: int, retries: int, dead: tuple[type[BaseException], ...] = ()):
        self.call, self.names, self.thresholds = call, list(names), [float(t) for t in thresholds]
        self.base_from, self.retries, self.dead = base_from, retries, dead
        self.retried = self.unavailable = 0

    async def stage(self, i: int, img, carry, deadline: float) -> tuple[int, float, Any]:
        """Stage i's answer, retried while Serve replaces a dead replica, until ``deadline``
        (time.monotonic()). A stage being deleted can leave a call waiting for a replica that
        never comes; the deadline answers it with a 503 before Serve kills this replica."""
        for attempt in range(self.retries + 1):
            response = self.call(i, (img, carry))
            call = asyncio.ensure_future(response)
            # not asyncio.wait_for: on timeout it also waits for the cancelled call to finish
            # cancelling, which on a starved machine kept a request waiting a minute past its
            # deadline while its call was still being routed
            try:
                done, _ = await asyncio.wait({call}, timeout=max(deadline - time.monotonic(), 0.0))
            finally:
                if not call.done():  # past the deadline, or the client left: so does the stage call
                    if hasattr(response, "cancel"):
                        response.cancel()
                    call.cancel()
            if not done:
                break
            try:
                return call.result()
            except self.dead:  # the replica died; Serve is starting another
                self.retried += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 3.0, max(deadline - time.monotonic(), 0.0)))
        self.unavailable += 1
        raise BadRequest(503, f"stage {self.names[i]} is restarting or overloaded; retry the request")

    async def answer(self, img, timeout_s: float, seen: list | None = None) -> tuple[int, int, float, Any]:
        """(answering stage, class, confidence, its carry) of one image; ``seen`` gets each stage's
        (class, confidence) as it runs."""
        last = len(self.names) - 1
        carry, deadline = None, time.monotonic() + timeout_s
        for i in range(last + 1):
            pred, conf, carry = await self.stage(i, img, carry, deadline)
            if seen is not None:
                seen.append((pred, conf))
            if i == last or exits(np.array([conf], dtype=np.float32), self.thresholds[i])[0]:
                return i, pred, conf, carry
        raise AssertionError("the last stage always answers")

    async def base_answer(self, img, answered: int, carry, timeout_s: float) -> int:
        """The base's own class: its chain from where the answer left (other savers skipped)."""
        deadline = time.monotonic() + timeout_s
        base_pred = None
        for j in range(max(answered + 1, self.base_from), len(self.names)):
            base_pred, _, carry = await self.stage(j, img, carry, deadline)
        return base_pred


class WalkAnswerer:
    """``spec``'s stages as deployments (``handles``, in running order); ``dead``: the exceptions
    that mean a replica is gone (the walk retries them)."""

    layout = "per-stage"
    stream_timeout_s = None  # each walk keeps its own deadline

    gearing = None  # gears switch in the fused layout only (ServiceSpec refuses them here)

    def __init__(self, spec: ServiceSpec, handles: Sequence, dead: tuple[type[BaseException], ...]):
        o = spec.options
        self.handles, self.names, self.dead = list(handles), list(spec.stages.names), dead
        self.timeout_s, self.first = o.request_timeout_s, o.adapt
        self.walk = StageWalk(lambda i, item: self.handles[i].classify.remote(item), spec.stages.names,
                              spec.stages.thresholds, spec.stages.base_from, o.retries, dead)
        self._starting, self._status_at = list(self.names), -float("inf")

    @property
    def thresholds(self) -> list[float]:
        return self.walk.thresholds

    def set_threshold(self, i: int, t: float) -> None:
        self.walk.thresholds[i] = float(t)

    @property
    def retried(self) -> int:
        return self.walk.retried

    @property
    def unavailable(self) -> int:
        return self.walk.unavailable

    async def answer(self, img) -> Answer:
        seen = [] if self.first else None
        i, pred, conf, carry = await self.walk.answer(img, self.timeout_s, seen)
        return i, pred, conf, carry, (seen[0] if seen else None), None  # no gears in this layout

    def submit(self, img, arrived: float) -> Awaitable:
        return self.answer(img)

    @staticmethod
    def unpack(answer: Answer) -> Answer:
        return answer

    async def answer_all(self, imgs: list, arrived: float) -> list[Answer]:
        return list(await asyncio.gather(*(self.answer(img) for img in imgs)))

    async def base_answer(self, img, answered: int, carry) -> int:
        return await self.walk.base_answer(img, answered, carry, self.timeout_s)

    def starting(self) -> list[str]:
        """Stage deployments Serve does not report HEALTHY yet (the ingress is up, and so answers,
        before its stages have loaded their models); one controller call per second at most."""
        from ray import serve

        now = time.monotonic()
        if now - self._status_at > 1.0:
            app = serve.get_replica_context().app_name
            deployments = serve.status().applications[app].deployments
            self._starting = [n for h, n in zip(self.handles, self.names)
                              if deployments[h.deployment_name].status != "HEALTHY"]
            self._status_at = now
        return self._starting

    async def batch_sizes(self) -> dict[str, Any]:
        out = {}
        for name, h in zip(self.names, self.handles):
            # a stage with no replica (its node lost, a new one not placed yet) would hold the call
            # until one comes: /metrics answers without it
            call = h.stats.remote()
            try:
                out[name] = (await asyncio.wait_for(asyncio.ensure_future(call), STATS_TIMEOUT_S))["batch_sizes"]
            except (asyncio.TimeoutError, *self.dead):
                call.cancel()
                out[name] = None
        return out

    def timing(self) -> dict[str, float | None]:
        return {}

    def timing_sums(self) -> dict[str, float]:
        return {}  # the stages run in their own deployments: the ingress times none of it


class ItemStage:
    """One engine stage on a list of (image, carry) items, one item per request: the carries are
    stacked into a batch and the carry handed on is split back into one per request."""

    def __init__(self, stage, device: str = "cpu"):
        self.stage, self.device = stage, device
        self.name = getattr(stage, "name", "stage")

    def __call__(self, items: list) -> list[tuple[int, float, object]]:
        images = [img for img, _ in items]
        carry = carry_stack([c for _, c in items], self.device)
        pred, conf, out = self.stage(images if getattr(self.stage, "needs_images", True) else None, carry)
        rows = carry_rows(out, len(items))
        return [(int(p), float(c), r) for p, c, r in zip(pred.tolist(), conf.float().tolist(), rows)]


__all__ = ["ItemStage", "StageWalk", "WalkAnswerer"]
