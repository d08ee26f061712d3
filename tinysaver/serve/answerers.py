"""The ingress's answerer: how a request finds its answer in each layout, behind one interface.

- ``FusedAnswerer``: this replica holds every stage; requests are batched (``batching.Batcher``)
  and each batch runs on the shared engine (``walk.FusedBatcher``).
- ``WalkAnswerer``: each stage is a deployment of its own; a request walks them in turn
  (``walk.StageWalk``), retried while Serve replaces a replica.

Each owns its live thresholds: ``set_threshold`` is the one way ``--adapt`` moves them, and the next
batch or walk reads them. An answer is five fields: (answering stage, class, confidence, its carry,
the first stage's (class, confidence) or None).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Sequence

from .batching import Batcher
from .http import BadRequest
from .options import ServiceSpec
from .stages import load_stages, stage_device
from .walk import FusedBatcher, StageWalk

FUSED_CUT = 4  # the most model batches (--max-batch-size each) a fused replica's engine call takes
STATS_TIMEOUT_S = 2.0  # how long /metrics waits for one stage's counters
OVERLOADED = "the service is overloaded; retry the request"

Answer = tuple  # (stage, class, confidence, carry, first stage's (class, confidence) or None)


class FusedAnswerer:
    """Every stage of ``plan`` in this replica. ``incoming()``: how many requests are being read
    or decoded now, which a batch waits for (a batch waits for company only then); under load it
    takes up to FUSED_CUT model batches, so that the base runs on full batches of their survivors
    rather than on each model batch's few."""

    layout = "fused"
    retried = unavailable = 0  # nothing is retried: every stage is in this process

    def __init__(self, plan: ServiceSpec, incoming):
        o = plan.options
        # a stream of answers waits at most this long: the engine's own futures, no task per image
        self.timeout_s = self.stream_timeout_s = o.request_timeout_s
        self.device = stage_device(max(o.per_stage("num_gpus", len(plan.stages))))
        built = load_stages(plan, self.device)
        self.engine = FusedBatcher([built[i] for i in range(len(plan.stages))], plan.stages.thresholds,
                                   plan.stages.base_from, first=o.adapt, batch_size=o.max_batch_size)
        self._batches = Batcher(self.engine.answer_batch, o.max_batch_size, o.batch_wait_timeout_s,
                                expected=incoming, max_cut=FUSED_CUT * o.max_batch_size)
        self._base = Batcher(self.engine.base_batch, o.max_batch_size, o.batch_wait_timeout_s)
        self.names = list(plan.stages.names)

    @property
    def thresholds(self) -> list[float]:
        return self.engine.thresholds

    def set_threshold(self, i: int, t: float) -> None:
        self.engine.thresholds[i] = float(t)

    def submit(self, img, arrived: float) -> asyncio.Future:
        """The future of ``img``'s engine answer, (stage, class, confidence[, the first stage's]):
        `unpack` makes it an `Answer`."""
        fut = asyncio.get_running_loop().create_future()
        self._batches.submit((img, fut, arrived))
        return fut

    @staticmethod
    def unpack(raw: tuple) -> Answer:
        i, pred, conf, *first = raw
        return i, pred, conf, None, (first[0] if first else None)

    async def answer(self, img) -> Answer:
        fut = self.submit(img, time.perf_counter())
        try:
            return self.unpack(await asyncio.wait_for(asyncio.shield(fut), self.timeout_s))
        except asyncio.TimeoutError:
            raise BadRequest(503, OVERLOADED) from None

    async def answer_all(self, imgs: list, arrived: float) -> list[Answer]:
        futures = [self.submit(img, arrived) for img in imgs]
        try:
            outs = await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, futures)), self.timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(503, OVERLOADED) from None
        return [self.unpack(o) for o in outs]

    async def base_answer(self, img, answered: int, carry) -> int:
        """The base's own class for ``img`` (an audit's question); batched with other audits."""
        try:
            return await asyncio.wait_for(self._base(img), self.timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(503, OVERLOADED) from None

    def starting(self) -> list[str]:
        return []  # a fused replica is its stages: up when it answers

    async def batch_sizes(self) -> dict:
        """The batches of requests, then what each stage ran on (the base: their survivors)."""
        return {"fused": {int(k): v for k, v in sorted(self.engine.sizes.items())},
                **{f"fused:{name}": dict(sorted(sizes.items())) for name, sizes in zip(self.names, self.engine.stage_sizes)}}

    def timing(self) -> dict[str, float | None]:
        """Mean ms per answered request waiting for a batch ("queue") and in the engine."""
        n = self.engine.timed
        return {k: round(1e3 * v / n, 3) if n else None for k, v in self.engine.timing.items()}


class WalkAnswerer:
    """``plan``'s stages as deployments (``handles``, in running order); ``dead``: the exceptions
    that mean a replica is gone (the walk retries them)."""

    layout = "per-stage"
    stream_timeout_s = None  # each walk keeps its own deadline

    def __init__(self, plan: ServiceSpec, handles: Sequence, dead: tuple[type[BaseException], ...]):
        o = plan.options
        self.handles, self.names, self.dead = list(handles), list(plan.stages.names), dead
        self.timeout_s, self.first = o.request_timeout_s, o.adapt
        self.walk = StageWalk(lambda i, item: self.handles[i].classify.remote(item), plan.stages.names,
                              plan.stages.thresholds, plan.stages.base_from, o.retries, dead)
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
        return i, pred, conf, carry, (seen[0] if seen else None)

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


__all__ = ["FUSED_CUT", "FusedAnswerer", "OVERLOADED", "WalkAnswerer"]
