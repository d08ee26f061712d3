"""The fused layout: every stage of the cascade in each replica of the ingress.

Requests are batched (``batching.Batcher``); ``FusedBatcher`` runs each batch through
`tinysaver.engine.run` and answers each request the moment its stage has answered it, so a request
the saver answers does not wait for the base pass of its batch's survivors. ``FusedAnswerer`` is
what the ingress asks: it owns the live thresholds (``set_threshold`` is the one way ``--adapt``
moves them, and the next batch reads them). An answer is five fields: (answering stage, class,
confidence, its carry, the first stage's (class, confidence) or None). Plain asyncio, no Ray.
"""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np

from .. import engine
from .batching import Batcher
from .http import OVERLOADED, BadRequest
from .options import Answer, ServiceSpec
from .stages import load_stages, stage_device

FUSED_CUT = 4  # the most model batches (--max-batch-size each) a fused replica's engine call takes


class FusedBatcher:
    """Every stage in this process (``stages``: engine stages in running order). ``first``: each
    answer also carries the first stage's (class, confidence) for its request, as a fourth field.
    ``batch_size``: the largest batch a model runs. A batch of more requests than that runs as
    ``Cascade.predict`` runs its input: in chunks of ``batch_size``, each later stage on full
    batches of the survivors (refill), so a base is not run on each chunk's few survivors."""

    def __init__(self, stages: Sequence, thresholds: Sequence[float], base_from: int, first: bool = False,
                 batch_size: int | None = None):
        self.stages, self.thresholds, self.base_from = list(stages), [float(t) for t in thresholds], base_from
        self.first, self.batch_size = first, batch_size
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
            values = [(i, int(p), float(c), saver[j]) if self.first else (i, int(p), float(c))
                      for j, p, c in zip(rows, pred.tolist(), conf.tolist())]
            loop.call_soon_threadsafe(settle, rows, values)

        def ran(i: int, idx: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
            sizes = self.stage_sizes[i]
            sizes[len(idx)] = sizes.get(len(idx), 0) + 1
            if i == 0 and self.first:
                saver.update(zip(idx.tolist(), zip(map(int, pred.tolist()), conf.astype(np.float64).tolist())))

        def work() -> float:
            cpu = time.thread_time()
            self._run(self.stages, list(self.thresholds), images, answered, ran, self.batch_size)
            return time.thread_time() - cpu

        self.sizes[len(items)] = self.sizes.get(len(items), 0) + 1
        try:
            self.timing["engine_cpu"] += await asyncio.to_thread(work)
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
        self.engine = FusedBatcher([built[i] for i in range(len(spec.stages))], spec.stages.thresholds,
                                   spec.stages.base_from, first=o.adapt, batch_size=o.max_batch_size)
        self._batches = Batcher(self.engine.answer_batch, o.max_batch_size, o.batch_wait_timeout_s,
                                expected=incoming, max_cut=FUSED_CUT * o.max_batch_size)
        self._base = Batcher(self.engine.base_batch, o.max_batch_size, o.batch_wait_timeout_s)
        self.names = list(spec.stages.names)

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

    def timing_sums(self) -> dict[str, float]:
        """Seconds summed over the answered requests: waiting for a batch ("queue") and in the engine."""
        return {k: self.engine.timing[k] for k in ("queue", "engine")}

    def timing(self) -> dict[str, float | None]:
        """Mean ms per answered request waiting for a batch ("queue") and in the engine."""
        n = self.engine.timed
        return {k: round(1e3 * v / n, 3) if n else None for k, v in self.engine.timing.items()}


__all__ = ["FUSED_CUT", "FusedAnswerer", "FusedBatcher"]
