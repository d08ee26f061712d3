"""Dynamic batching for the replicas: plain asyncio, no Ray.

Why not ``@serve.batch``: in the Ray installed here (2.60, since the concurrent batches of
ray-project/ray#53096) its loop cuts a batch off the queue *before* it waits for a free slot
(``max_concurrent_batches``). Under load it keeps cutting batches of one or two requests, which
then queue behind the running one, and the models run at batch 1, where they cost several times
more per image (the per-batch latencies of ``tinysaver zoo show fashion-mnist``). RESULTS, "The
fused service with its own batcher", has the service before and after.

``Batcher`` cuts a batch only when the previous one is done: everything that arrived meanwhile,
up to ``max_batch_size`` (or ``max_cut``, for a ``run`` that splits its items into model batches
itself, as the fused replica's engine does). An idle replica waits at most ``wait_s`` from a
batch's oldest request for it to fill, and not at all when ``expected()`` says no other request
is on its way (still being read or decoded), so a lone request does not wait for company that is
not coming. Under load the wait is the running batch's time, not a timeout.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable

from ..errors import ServeError


class Batcher:
    """``await batcher(item)`` → ``run``'s result for that item (``submit`` gives the future without
    waiting). ``run(items)`` (async) gets a list of 1 … ``max_cut`` items and returns one
    result per item, in order; one call at a time. ``wait_s``: seconds a batch may wait for more
    items after its oldest arrived; ``expected()``: how many more are on their way (None: unknown,
    wait the full ``wait_s``). ``max_cut`` (default ``max_batch_size``): the most items one call of
    ``run`` gets; a batch stops waiting once ``max_batch_size`` have arrived, and then takes every
    waiting item up to ``max_cut``. ``sizes``: {batch size: batches run}."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float,
                 expected: Callable[[], int] | None = None, max_cut: int | None = None):
        max_cut = max_batch_size if max_cut is None else max_cut
        if max_batch_size < 1 or wait_s < 0 or max_cut < max_batch_size:
            raise ServeError(f"max_batch_size must be ≥ 1, wait_s ≥ 0 and max_cut ≥ max_batch_size, got "
                             f"{max_batch_size}, {wait_s} and {max_cut}")
        self.run, self.max_batch_size, self.wait_s = run, int(max_batch_size), float(wait_s)
        self.max_cut = int(max_cut)
        self.expected = expected
        self.sizes: dict[int, int] = {}
        self._queue: deque = deque()  # (item, future, arrival time.monotonic())
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    def submit(self, item: Any) -> asyncio.Future:
        """Queue ``item`` (from the event loop's thread); the future gets its result."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        fut = loop.create_future()
        self._queue.append((item, fut, time.monotonic()))
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._serve())
        return fut

    async def __call__(self, item: Any) -> Any:
        return await self.submit(item)

    @property
    def waiting(self) -> int:
        """Items queued and not yet cut into a batch."""
        return len(self._queue)

    async def _next_batch(self) -> list:
        """The next batch, once it is full or its oldest item has waited ``wait_s``."""
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        deadline = self._queue[0][2] + self.wait_s
        while len(self._queue) < self.max_batch_size:
            if self.expected is not None and self.expected() <= 0:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_cut))]
        # a request whose caller gave up (client gone, deadline) is not run
        return [b for b in batch if not b[1].done()]

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
            try:
                results = await self.run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
            except Exception as e:  # every request of the batch learns of it; the loop goes on
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut, _), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)


__all__ = ["Batcher"]
