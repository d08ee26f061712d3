"""The replicas' batcher without Ray: when it cuts a batch, and what a failed or abandoned request does."""
import asyncio

import pytest

from tinysaver.errors import ServeError
from tinysaver.serve.batching import Batcher


class Gate:
    """A batch function the test holds: it records each batch and waits for ``release``."""

    def __init__(self):
        self.batches, self.started, self.release = [], asyncio.Event(), asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return [x * 10 for x in items]


def test_the_batcher_cuts_the_next_batch_only_when_the_running_one_is_done():
    """What arrives while a batch runs goes into the next batch, up to max_batch_size (Ray
    2.60's @serve.batch cut those into batches of one or two)."""
    async def go():
        gate = Gate()
        b = Batcher(gate, max_batch_size=16, wait_s=0.0)
        first = asyncio.ensure_future(b(0))
        await gate.started.wait()  # the first batch is running
        rest = [asyncio.ensure_future(b(i)) for i in range(1, 21)]
        for _ in range(20):
            await asyncio.sleep(0)  # let every caller queue its item
        gate.release.set()
        return await asyncio.gather(first, *rest), gate.batches, b.sizes

    results, batches, sizes = asyncio.run(go())
    assert results == [10 * i for i in range(21)]
    assert batches == [[0], list(range(1, 17)), list(range(17, 21))]
    assert sizes == {1: 1, 16: 1, 4: 1}


def test_a_batcher_with_a_larger_cut_stops_waiting_at_a_full_batch_and_takes_what_waits():
    """``max_cut``: a batch still goes as soon as ``max_batch_size`` have come, but takes every
    item waiting then, up to ``max_cut`` (the fused engine splits them into model batches)."""
    async def go():
        gate, coming = Gate(), [100]  # more said to be on their way: only a full batch stops the wait
        b = Batcher(gate, max_batch_size=4, wait_s=60.0, expected=lambda: coming[0], max_cut=10)
        first = [asyncio.ensure_future(b(i)) for i in range(4)]  # full: does not wait the 60 s
        await asyncio.wait_for(gate.started.wait(), 30)
        rest = [asyncio.ensure_future(b(i)) for i in range(4, 17)]
        for _ in range(20):
            await asyncio.sleep(0)
        coming[0] = 0  # so that the short tail goes too
        gate.release.set()
        return await asyncio.wait_for(asyncio.gather(*first, *rest), 30), gate.batches

    results, batches = asyncio.run(go())
    assert results == [10 * i for i in range(17)]
    assert batches == [[0, 1, 2, 3], list(range(4, 14)), list(range(14, 17))]
    with pytest.raises(ServeError, match="max_cut"):
        Batcher(lambda x: x, 4, 0.0, max_cut=3)


def test_a_full_batch_does_not_wait_and_a_failed_batch_fails_only_its_requests():
    calls = []

    async def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return [-x for x in items]

    async def go():
        b = Batcher(flaky, max_batch_size=3, wait_s=60.0)  # a full batch never waits for wait_s
        first = await asyncio.wait_for(asyncio.gather(*(b(i) for i in range(3)), return_exceptions=True), 30)
        second = await asyncio.wait_for(asyncio.gather(*(b(i) for i in range(3, 6))), 30)
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(e, RuntimeError) for e in first)
    assert second == [-3, -4, -5] and calls == [[0, 1, 2], [3, 4, 5]]


def test_the_batcher_skips_a_request_whose_caller_gave_up_and_checks_the_result_count():
    async def go():
        gate = Gate()
        b = Batcher(gate, max_batch_size=8, wait_s=0.0)
        first = asyncio.ensure_future(b(1))
        await gate.started.wait()
        gone, kept = asyncio.ensure_future(b(2)), asyncio.ensure_future(b(3))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. its request's deadline passed while it waited
        gate.release.set()
        out = await asyncio.gather(first, kept)

        async def short(items):
            return items[:-1]

        bad = Batcher(short, max_batch_size=2, wait_s=0.0)
        with pytest.raises(RuntimeError, match="a batch of 2 got 1 results"):
            await asyncio.gather(bad(1), bad(2))
        return out, gate.batches

    out, batches = asyncio.run(go())
    assert out == [10, 30] and batches == [[1], [3]]
    with pytest.raises(ServeError, match="max_batch_size"):
        Batcher(lambda x: x, 0, 0.0)


def test_a_lone_request_does_not_wait_for_company_that_is_not_coming():
    """With ``expected``, a batch stops waiting once no other request is on its way."""
    async def go():
        coming = [0]
        gate = Gate()
        gate.release.set()
        b = Batcher(gate, max_batch_size=8, wait_s=60.0, expected=lambda: coming[0])
        alone = await asyncio.wait_for(b(1), 30)  # nothing on its way: no 60 s wait
        coming[0] = 1  # one more is being decoded
        first = asyncio.ensure_future(b(2))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not gate.batches[1:], "the batch went before the expected request came"
        coming[0] = 0
        second = asyncio.ensure_future(b(3))
        return alone, await asyncio.wait_for(asyncio.gather(first, second), 30), gate.batches

    alone, pair, batches = asyncio.run(go())
    assert alone == 10 and pair == [20, 30] and batches == [[1], [2, 3]]
