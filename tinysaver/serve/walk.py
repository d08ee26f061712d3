"""How one request finds its answer, in each layout. Plain asyncio, no Ray: the deployments give
these classes their stages, and tests give them stand-ins.

- ``StageWalk`` (per-stage layout): asks stage deployments in turn, one request at a time, retrying
  a stage whose replica died while Serve replaces it, until the request's deadline.
- ``FusedBatcher`` (fused layout): runs every stage of the replica on batches of requests through
  one :class:`tinysaver.engine.Flow`, and answers each request the moment its stage has answered
  it, so a request the saver answers does not wait for the base pass of its batch's survivors.
"""
from __future__ import annotations

import asyncio
import itertools
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
    """Every stage in this process (``stages``: engine stages in running order), as one
    :class:`tinysaver.engine.Flow` kept for the replica's life.

    ``answer_batch`` runs the first stage on a batch of requests and returns; the later stages run
    on its survivors in a thread of their own while the first stage takes the next batch (on a CPU
    replica the two passes use two cores, as ``Cascade(pipeline=True)`` does). With ``batch_size``,
    while more requests are coming (the first stage is running, or ``more()``), a later stage runs
    only full batches of ``batch_size`` and a remainder waits for the next batch's survivors, at most
    ``hold_s`` seconds: the refill of ``Cascade.predict``, so the base does not run at a third of a
    batch. ``first``: each answer also carries the first stage's (class, confidence) for its request.
    """

    def __init__(self, stages: Sequence, thresholds: Sequence[float], base_from: int, first: bool = False,
                 batch_size: int | None = None, hold_s: float = 0.0, more: Callable[[], bool] | None = None):
        self.stages, self.thresholds, self.base_from = list(stages), [float(t) for t in thresholds], base_from
        self.first, self.batch_size, self.hold_s, self.more = first, batch_size, float(hold_s), more
        self.sizes: dict[int, int] = {}  # {requests in a batch: batches}
        self.stage_sizes: list[dict[int, int]] = [{} for _ in self.stages]  # each stage's {batch size: batches}
        # seconds summed over answered requests: "queue" from the request's arrival (an item's
        # third field, time.perf_counter()) to its batch's start, "engine" from there to its answer;
        # "engine_cpu": the CPU time of the engine's threads, summed over their batches
        self.timing: dict[str, float] = {"queue": 0.0, "engine": 0.0, "engine_cpu": 0.0}
        self.timed = 0
        self._ids = itertools.count()
        self._images: dict[int, Any] = {}  # request id → image, until answered
        self._waiting: dict[int, tuple] = {}  # request id → (future, arrival or None, batch start)
        self._saver: dict[int, tuple[int, float]] = {}  # request id → the first stage's answer (first)
        self._in_first: set[int] = set()  # the requests of the first stage's running batch
        self._held_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._later_task: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        # self.thresholds itself, not a copy: --adapt retunes it between batches
        self._flow = engine.Flow(self.stages, self.thresholds, self._take, self._answered, self._ran)

    @property
    def held(self) -> int:
        """Requests past the first stage, waiting for a later one."""
        return self._flow.held

    # --- called by the engine, in its threads --------------------------------------------------
    def _take(self, idx: np.ndarray) -> list:
        return [self._images[j] for j in idx.tolist()]

    def _ran(self, i: int, idx: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
        sizes = self.stage_sizes[i]
        sizes[len(idx)] = sizes.get(len(idx), 0) + 1
        if i == 0 and self.first:
            for j, p, c in zip(idx.tolist(), pred.tolist(), conf.astype(np.float64).tolist()):
                self._saver[j] = (int(p), c)

    def _answered(self, i: int, idx: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
        """Stage i answered requests ``idx``: one call into the event loop for all of them."""
        ids = idx.tolist()
        values = [(i, int(p), float(c), self._saver.pop(j)) if self.first else (i, int(p), float(c))
                  for j, p, c in zip(ids, pred.tolist(), conf.tolist())]
        for j in ids:
            self._images.pop(j, None)
        self._loop.call_soon_threadsafe(self._settle, ids, values)

    # --- the event loop's side ------------------------------------------------------------------
    def _settle(self, ids: list[int], values: list[tuple]) -> None:
        now = time.perf_counter()
        for j, value in zip(ids, values):
            fut, arrived, start = self._waiting.pop(j, (None, None, None))
            if fut is not None and not fut.done():
                fut.set_result(value)
            if arrived is not None:
                self.timing["queue"] += start - arrived
                self.timing["engine"] += now - start
                self.timed += 1

    def _fail(self, ids, error: Exception) -> None:
        for j in list(ids):
            fut, *_ = self._waiting.pop(j, (None,))
            self._images.pop(j, None)
            self._saver.pop(j, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)

    async def answer_batch(self, items: list[tuple]) -> list[None]:
        """Answer a batch of (image, future[, arrival time]) items: each future gets (stage, class,
        confidence) as soon as its stage has run, from the thread the engine runs in. Returns once
        the first stage is done with the batch."""
        self._loop = asyncio.get_running_loop()
        start = time.perf_counter()
        ids = np.fromiter((next(self._ids) for _ in items), dtype=np.int64, count=len(items))
        for j, item in zip(ids.tolist(), items):
            self._images[j] = item[0]
            self._waiting[j] = (item[1], item[2] if len(item) > 2 else None, start)
        self.sizes[len(items)] = self.sizes.get(len(items), 0) + 1
        flow = self._flow

        def first() -> float:
            cpu = time.thread_time()
            flow.put(ids)
            flow.drain(0, max(len(ids), 1))
            return time.thread_time() - cpu

        self._in_first = set(ids.tolist())
        try:
            self.timing["engine_cpu"] += await asyncio.to_thread(first)
        except Exception as e:  # its requests learn of it (this is the loop's own thread)
            self._fail(self._in_first, e)
        finally:
            self._in_first = set()
        if flow.held:
            if self._held_since is None:
                self._held_since = time.monotonic()
            if self._later_task is None or self._later_task.done():
                self._kick = asyncio.Event()
                self._later_task = self._loop.create_task(self._later())
            self._kick.set()
        return [None] * len(items)

    def _holding(self) -> bool:
        """Whether a later stage's short batch may wait: more requests are coming."""
        return self.batch_size is not None and bool(self._in_first or (self.more is not None and self.more()))

    async def _later(self) -> None:
        """The stages after the first, on what they hold, until they hold nothing."""
        flow, size = self._flow, self.batch_size or 2 ** 31
        while flow.held:
            self._kick.clear()
            hold = self._holding()
            if hold and not any(q.count >= size for q in flow.waiting[1:]):
                left = self._held_since + self.hold_s - time.monotonic() if self._held_since else 0.0
                if left > 0:
                    try:  # woken by the first stage's next survivors
                        await asyncio.wait_for(self._kick.wait(), left)
                        continue
                    except asyncio.TimeoutError:
                        pass
                hold = False  # held long enough: run what there is

            def later(hold=hold) -> float:
                cpu = time.thread_time()
                for i in range(1, len(self.stages)):
                    flow.drain(i, size, full_only=hold)
                return time.thread_time() - cpu

            try:
                self.timing["engine_cpu"] += await asyncio.to_thread(later)
            except Exception as e:  # fail what the later stages held; the first stage's batch goes on
                flow.clear(from_stage=1)
                self._fail([j for j in self._waiting if j not in self._in_first], e)
            if not flow.held:
                self._held_since = None
            elif not hold:
                self._held_since = time.monotonic()

    @staticmethod
    def _run(stages: list, thresholds: list[float], images: list, answer) -> None:
        """``stages`` on ``images`` as one batch, on a one-off engine run (the audit's base pass)."""
        n = len(images)
        engine.run(stages, thresholds, n, lambda idx: [images[i] for i in idx], answer, batch_size=n)

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
