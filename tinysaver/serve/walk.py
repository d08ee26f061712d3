"""How one request finds its answer, in each layout. Plain asyncio, no Ray: the deployments give
these classes their stages, and tests give them stand-ins.

- ``StageWalk`` (per-stage layout): asks stage deployments in turn, one request at a time, retrying
  a stage whose replica died while Serve replaces it, until the request's deadline.
- ``FusedBatcher`` (fused layout): runs every stage of the replica on a batch of requests through
  `tinysaver.engine.run`, and answers each request the moment its stage has answered it, so
  a request the saver answers does not wait for the base pass of its batch's survivors.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import numpy as np

from .. import engine
from ..policy import exits
from .http import BadRequest


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


__all__ = ["FusedBatcher", "StageWalk"]
