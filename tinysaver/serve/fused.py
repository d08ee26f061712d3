"""The fused layout: every stage of the cascade in each replica of the ingress.

Requests are batched (``batching.Batcher``); ``FusedBatcher`` runs each batch through
`tinysaver.engine.run` and answers each request the moment its stage has answered it, so a request
the saver answers does not wait for the base pass of its batch's survivors. ``FusedAnswerer`` is
what the ingress asks: it owns the live thresholds (``set_threshold`` is the one way ``--adapt``
moves them, and the next batch reads them). An answer is six fields: (answering stage, class,
confidence, its carry, the first stage's (class, confidence) or None, the gear that answered it or
None). With ``--gears``, `Gearing` picks each batch's saver threshold. Plain asyncio, no Ray.
"""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np

from .. import engine
from ..gears import GearBox, GearPlan
from .batching import Batcher
from .http import OVERLOADED, BadRequest
from .options import Answer, ServiceSpec
from .stages import load_stages, stage_device

FUSED_CUT = 4  # the most model batches (--max-batch-size each) a fused replica's engine call takes
ARRIVALS_TAU_S = 1.0  # the time constant of the arrival rate a gear decision reads
CAPACITY_WEIGHT = 0.2  # the weight of the latest batch in the capacity estimate (images/s of engine time)


class Gearing:
    """A fused replica's gears (``--gears``): before each batch, `tinysaver.gears.GearBox` picks the
    gear from the queue, the arrival rate and the engine's measured capacity; ``forced`` holds gear
    0 (the audit's drift alarm sets it). Called from the event loop only."""

    def __init__(self, plan: dict, target_ms: float):
        plan = GearPlan.from_dict(plan)
        self.thresholds = plan.thresholds
        self.costs = [g.cost for g in plan.gears]
        self.box = GearBox(self.costs, target_ms)
        self.capacity0: float | None = None  # images/s of engine time, in gear 0's units
        self.rate, self.last = 0.0, time.perf_counter()
        self.forced = False
        self.answers = [0] * len(self.thresholds)

    def arrived(self, n: int, now: float) -> None:
        self.rate = self.arrivals(now) + n / ARRIVALS_TAU_S
        self.last = now

    def arrivals(self, now: float) -> float:
        """Images per second arriving lately (exponentially weighted, ``ARRIVALS_TAU_S``)."""
        return self.rate * float(np.exp(-max(now - self.last, 0.0) / ARRIVALS_TAU_S))  # a clock read late

    def choose(self, serving: int, waiting: int, oldest_s: float, now: float) -> int:
        """The gear of a batch of ``serving`` images with ``waiting`` behind it (`GearBox.decide`)."""
        if self.forced:
            if self.box.gear:
                self.box.shift(0, waiting)
            return 0
        if self.capacity0 is None:  # nothing measured yet: the zero-loss gear
            return self.box.gear
        g = self.box.gear
        return self.box.decide(waiting, 1e3 * oldest_s, self.capacity0 * self.costs[0] / self.costs[g],
                               self.arrivals(now), serving)

    def served(self, gear: int, n: int, busy_s: float) -> None:
        if busy_s > 0 and n:
            now = n / busy_s * self.costs[gear] / self.costs[0]
            self.capacity0 = now if self.capacity0 is None else (
                (1 - CAPACITY_WEIGHT) * self.capacity0 + CAPACITY_WEIGHT * now)

    def view(self) -> dict:
        return {"in_use": self.box.gear, "forced": self.forced, "thresholds": self.thresholds,
                "answers": list(self.answers), "switches": len(self.box.switches),
                "capacity_img_s": None if self.capacity0 is None else round(
                    self.capacity0 * self.costs[0] / self.costs[self.box.gear], 1)}


class FusedBatcher:
    """Every stage in this process (``stages``: engine stages in running order). Each answer is
    (stage, class, confidence, the first stage's (class, confidence) with ``first`` else None, the
    gear with ``gearing`` else None).
    ``batch_size``: the largest batch a model runs. A batch of more requests than that runs as
    ``Cascade.predict`` runs its input: in chunks of ``batch_size``, each later stage on full
    batches of the survivors (refill), so a base is not run on each chunk's few survivors."""

    def __init__(self, stages: Sequence, thresholds: Sequence[float], base_from: int, first: bool = False,
                 batch_size: int | None = None, gearing: Gearing | None = None, queued=lambda: 0):
        self.stages, self.thresholds, self.base_from = list(stages), [float(t) for t in thresholds], base_from
        self.first, self.batch_size = first, batch_size
        # --gears: each batch runs at the saver threshold of the gear chosen from the queue
        # (``queued()``: requests waiting behind this batch, those still being read or decoded
        # included); each answer names its gear
        self.gearing, self.queued = gearing, queued
        self.sizes: dict[int, int] = {}  # {requests in a batch: batches}
        self.stage_sizes: list[dict[int, int]] = [{} for _ in self.stages]  # each stage's {batch size: batches}
        # seconds summed over answered requests: "queue" from the request's arrival (an item's
        # third field, time.perf_counter()) to its batch's start, "engine" from there to its answer;
        # "engine_cpu": the CPU time of the engine's thread, summed over its batches
        self.timing: dict[str, float] = {"queue": 0.0, "engine": 0.0, "engine_cpu": 0.0}
        self.timed = 0

    async def answer_batch(self, items: list[tuple]) -> list[None]:
        """Answer a batch of (image, future[, arrival time]) items: each future gets (stage, class,
        confidence) as soon as its stage has run, from the thread the engine runs in."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        images = [item[0] for item in items]
        saver: dict[int, tuple[int, float]] = {}
        thresholds, gear = list(self.thresholds), None
        if self.gearing is not None:
            oldest = min((item[2] for item in items if len(item) > 2), default=start)
            gear = self.gearing.choose(len(items), self.queued(), start - oldest, start)
            thresholds[0] = self.gearing.thresholds[gear]

        def settle(rows: list[int], values: list[tuple]) -> None:
            now = time.perf_counter()
            for j, value in zip(rows, values):
                _, fut, *arrived = items[j]
                if not fut.done():
                    fut.set_result(value)
                if arrived:
                    self.timing["queue"] += start - arrived[0]
                    self.timing["engine"] += now - start
                    self.timed += 1

        def answered(i: int, idx: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
            rows = idx.tolist()  # one call into the event loop for the rows a stage answered together
            values = [(i, int(p), float(c), saver[j] if self.first else None, gear)
                      for j, p, c in zip(rows, pred.tolist(), conf.tolist())]
            loop.call_soon_threadsafe(settle, rows, values)

        def ran(i: int, idx: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
            sizes = self.stage_sizes[i]
            sizes[len(idx)] = sizes.get(len(idx), 0) + 1
            if i == 0 and self.first:
                saver.update(zip(idx.tolist(), zip(map(int, pred.tolist()), conf.astype(np.float64).tolist())))

        def work() -> float:
            cpu = time.thread_time()
            self._run(self.stages, thresholds, images, answered, ran, self.batch_size)
            return time.thread_time() - cpu

        self.sizes[len(items)] = self.sizes.get(len(items), 0) + 1
        try:
            self.timing["engine_cpu"] += await asyncio.to_thread(work)
            if self.gearing is not None:
                self.gearing.served(gear, len(items), time.perf_counter() - start)
                self.gearing.answers[gear] += len(items)
        except Exception as e:  # every waiting request learns of it (this is the loop's own thread)
            for _, fut, *_ in items:
                if not fut.done():
                    fut.set_exception(e)
        return [None] * len(items)

    @staticmethod
    def _run(stages: list, thresholds: list[float], images: list, answer, ran=None,
             batch_size: int | None = None) -> None:
        """``stages`` on ``images`` (the batch the replica's Batcher formed, or the audit's), in model
        batches of at most ``batch_size`` (None: all at once)."""
        n = len(images)
        engine.run(stages, thresholds, n, lambda idx: [images[i] for i in idx], answer,
                   batch_size=n if batch_size is None else min(n, batch_size), on_run=ran)

    async def base_batch(self, images: list) -> list[int]:
        """The base's own class for each image, no exit taken. A base that is one stage on images
        (a saver cascade) runs alone; a base in parts (ESN) runs from the saver, whose carry its
        first part needs."""
        out = [None] * len(images)

        def answer(i, idx, pred, conf):
            for j, p in zip(idx.tolist(), pred.tolist()):
                out[j] = int(p)

        alone = self.base_from == len(self.stages) - 1
        stages = self.stages[-1:] if alone else self.stages
        await asyncio.to_thread(self._run, stages, [float("inf")] * (len(stages) - 1), images, answer)
        return out


class FusedAnswerer:
    """Every stage of ``spec`` in this replica. ``incoming()``: how many requests are being read
    or decoded now, which a batch waits for (a batch waits for company only then); under load it
    takes up to FUSED_CUT model batches, so that the base runs on full batches of their survivors
    rather than on each model batch's few."""

    layout = "fused"
    retried = unavailable = 0  # nothing is retried: every stage is in this process

    def __init__(self, spec: ServiceSpec, incoming):
        o = spec.options
        # a stream of answers waits at most this long: the engine's own futures, no task per image
        self.timeout_s = self.stream_timeout_s = o.request_timeout_s
        self.device = stage_device(max(o.per_stage("num_gpus", len(spec.stages))))
        built = load_stages(spec, self.device)
        self.gearing = Gearing(spec.gears, o.latency_target_ms) if o.gears else None
        thresholds = list(spec.stages.thresholds)
        if self.gearing:  # gear 0 first: the zero-loss policy, raised to the certified grid
            thresholds[0] = self.gearing.thresholds[0]
        self.engine = FusedBatcher([built[i] for i in range(len(spec.stages))], thresholds,
                                   spec.stages.base_from, first=o.adapt, batch_size=o.max_batch_size,
                                   gearing=self.gearing, queued=lambda: self._batches.waiting + incoming())
        self._batches = Batcher(self.engine.answer_batch, o.max_batch_size, o.batch_wait_timeout_s,
                                expected=incoming, max_cut=FUSED_CUT * o.max_batch_size)
        self._base = Batcher(self.engine.base_batch, o.max_batch_size, o.batch_wait_timeout_s)
        self.names = list(spec.stages.names)

    @property
    def thresholds(self) -> list[float]:
        """The thresholds the next batch meets (with --gears, the saver's is the gear in use's)."""
        if self.gearing is None:
            return self.engine.thresholds
        return [self.gearing.thresholds[self.gearing.box.gear], *self.engine.thresholds[1:]]

    def set_threshold(self, i: int, t: float) -> None:
        self.engine.thresholds[i] = float(t)

    def submit(self, img, arrived: float) -> asyncio.Future:
        """The future of ``img``'s engine answer (see `FusedBatcher`): `unpack` makes it an `Answer`."""
        fut = asyncio.get_running_loop().create_future()
        self._batches.submit((img, fut, arrived))
        if self.gearing is not None:
            self.gearing.arrived(1, time.perf_counter())
        return fut

    @staticmethod
    def unpack(raw: tuple) -> Answer:
        i, pred, conf, first, gear = raw
        return i, pred, conf, None, first, gear

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

    def timing_sums(self) -> dict[str, float]:
        """Seconds summed over the answered requests: waiting for a batch ("queue") and in the engine."""
        return {k: self.engine.timing[k] for k in ("queue", "engine")}

    def timing(self) -> dict[str, float | None]:
        """Mean ms per answered request waiting for a batch ("queue") and in the engine."""
        n = self.engine.timed
        return {k: round(1e3 * v / n, 3) if n else None for k, v in self.engine.timing.items()}


__all__ = ["FUSED_CUT", "FusedAnswerer", "FusedBatcher", "Gearing"]
