"""How a request is answered without Ray: the per-stage walk with dying replicas, the fused batcher's
early answers, each layout's answerer."""
import asyncio
import time

import pytest
import torch

from tests.helpers import stage_plan
from tinysaver import engine
from tinysaver.serve import BadRequest, ServiceSpec, ServeOptions
from tinysaver.serve.fused import FusedBatcher
from tinysaver.serve.per_stage import StageWalk


class Dead(Exception):
    pass


def test_the_walk_retries_a_dead_replica_then_answers_503_at_the_deadline():
    calls = []

    def call(i, item):
        calls.append(i)

        async def answer():
            if i == 1 and calls.count(1) <= 2:
                raise Dead()  # the base replica died twice; Serve replaced it
            return (i * 10, 0.95 if i == 0 and item[0] == "easy" else 0.1, f"carry{i}")
        return answer()

    walk = StageWalk(call, ["s", "b"], [0.9], base_from=1, retries=5, dead=(Dead,))
    assert asyncio.run(walk.answer("easy", 5.0)) == (0, 0, 0.95, "carry0")
    assert asyncio.run(walk.answer("hard", 5.0)) == (1, 10, 0.1, "carry1")
    assert walk.retried == 2 and calls.count(1) == 3
    seen = []  # --adapt reads the saver's answer for requests the base answered
    assert asyncio.run(walk.answer("hard", 5.0, seen)) == (1, 10, 0.1, "carry1") and seen == [(0, 0.1), (10, 0.1)]

    def hang(i, item):
        return asyncio.sleep(60)

    slow = StageWalk(hang, ["s", "b"], [0.9], base_from=1, retries=5, dead=(Dead,))
    t0 = time.monotonic()
    with pytest.raises(BadRequest) as e:
        asyncio.run(slow.answer("x", 0.2))
    assert e.value.status == 503 and "retry" in e.value.reason and time.monotonic() - t0 < 30
    assert slow.unavailable == 1


def test_the_audit_walk_asks_only_the_base_chain_from_where_the_answer_left():
    """Per-stage audits: a saver cascade skips the other savers and asks the base alone; an ESN
    (base in parts) goes on from the answering part with its carry."""
    calls = []

    def call(i, item):
        calls.append((i, item[1]))

        async def answer():
            return (100 + i, 0.1, f"carry{i}")
        return answer()

    savers = StageWalk(call, ["s1", "s2", "b"], [0.9, 0.9], base_from=2, retries=0)
    assert asyncio.run(savers.base_answer("img", 0, "carry0", 5.0)) == 102 and calls == [(2, "carry0")]
    calls.clear()
    parts = StageWalk(call, ["saver", "p1", "p2"], [0.9, 0.9], base_from=1, retries=0)
    assert asyncio.run(parts.base_answer("img", 1, "carry1", 5.0)) == 102 and calls == [(2, "carry1")]
    calls.clear()
    assert asyncio.run(parts.base_answer("img", 0, "carry0", 5.0)) == 102 and calls == [(1, "carry0"), (2, "carry1")]


class Slow:
    """A stage that answers by a fixed confidence and takes ``seconds``."""

    def __init__(self, conf, seconds, log):
        self.conf, self.seconds, self.log, self.name = conf, seconds, log, f"c{conf}"

    def __call__(self, images, carry):
        self.log.append(("start", self.name, time.monotonic()))
        time.sleep(self.seconds)
        self.log.append(("end", self.name, time.monotonic()))
        ids = torch.as_tensor([int(im) for im in images])
        conf = torch.where(ids % 2 == 0, torch.tensor(self.conf), torch.tensor(0.0))  # even ids exit early
        return ids, conf, None


def test_fused_early_answers_do_not_wait_for_the_base_pass_of_their_batch():
    log = []
    saver, base = Slow(0.99, 0.05, log), Slow(1.0, 1.0, log)
    batcher = FusedBatcher([saver, base], [0.9], base_from=1)

    async def go():
        loop = asyncio.get_running_loop()
        items = [(i, loop.create_future()) for i in range(6)]
        got = {}

        async def wait(i, fut):
            got[i] = (await fut, time.monotonic())

        waiters = [asyncio.ensure_future(wait(i, f)) for i, f in items]
        await batcher.answer_batch(items)
        await asyncio.gather(*waiters)
        return got

    got = asyncio.run(go())
    base_end = next(t for kind, name, t in log if kind == "end" and name == base.name)
    for i, ((stage, pred, conf, *_), t) in got.items():
        assert pred == i and stage == (0 if i % 2 == 0 else 1)
        if stage == 0:  # answered while the base was still running on the odd ones
            assert t < base_end - 0.5, (i, base_end - t)
    assert batcher.sizes == {6: 1} and batcher.stage_sizes == [{6: 1}, {3: 1}]  # the base ran the odd three
    assert asyncio.run(batcher.base_batch([1, 2, 3])) == [1, 2, 3]  # the base alone, for the audit
    assert batcher.timed == 0  # items without an arrival time are not timed


def answer_all(batcher: FusedBatcher, n: int) -> list:
    """Requests 0 … n-1 answered by ``batcher`` as one batch: their answers, in order."""
    async def go():
        loop = asyncio.get_running_loop()
        items = [(i, loop.create_future()) for i in range(n)]
        await batcher.answer_batch(items)
        return [await f for _, f in items]

    return asyncio.run(go())


def test_a_fused_batcher_for_adapt_gives_the_savers_answer_with_every_request():
    """--adapt needs the saver's class and confidence for requests the base answered, too."""
    log = []
    batcher = FusedBatcher([Slow(0.99, 0.0, log), Slow(1.0, 0.0, log)], [0.9], base_from=1, first=True)

    got = answer_all(batcher, 4)
    assert [g[:2] for g in got] == [(0, 0), (1, 1), (0, 2), (1, 3)]
    saver = [(p, round(c, 6)) for _, _, _, (p, c), _ in got]
    assert saver == [(0, 0.99), (1, 0.0), (2, 0.99), (3, 0.0)]  # the saver's, on either stage


def test_fused_batcher_times_the_wait_for_a_batch_and_the_engine():
    log = []
    batcher = FusedBatcher([Slow(0.99, 0.05, log), Slow(1.0, 0.2, log)], [0.9], base_from=1)

    async def go():
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        items = [(i, loop.create_future(), arrived) for i in range(4)]
        await asyncio.sleep(0.1)  # as if the Batcher had waited for more requests
        await batcher.answer_batch(items)
        await asyncio.gather(*(f for _, f, _ in items))

    asyncio.run(go())
    assert batcher.timed == 4
    assert batcher.timing["queue"] >= 4 * 0.1 - 1e-3
    # two answered after the saver (≥ 0.05 s), two after the base too (≥ 0.25 s)
    assert batcher.timing["engine"] >= 2 * 0.05 + 2 * 0.25 - 1e-3


def test_a_failing_fused_batch_fails_every_waiting_request():
    class Boom:
        name = "boom"

        def __call__(self, images, carry):
            raise RuntimeError("model failed")

    batcher = FusedBatcher([Boom(), Boom()], [0.5], base_from=1)

    async def go():
        loop = asyncio.get_running_loop()
        items = [(i, loop.create_future()) for i in range(3)]
        await batcher.answer_batch(items)
        return [f.exception() for _, f in items]

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(go()))


def test_a_failing_base_fails_only_its_batchs_survivors_and_the_replica_goes_on():
    class FlakyBase:
        name, calls = "flaky", 0

        def __call__(self, images, carry):
            FlakyBase.calls += 1
            if FlakyBase.calls == 1:
                raise RuntimeError("base failed")
            ids = torch.as_tensor([int(im) for im in images])
            return ids, torch.ones(len(ids)), None

    batcher = FusedBatcher([Slow(0.99, 0.0, []), FlakyBase()], [0.9], base_from=1)

    async def go():
        loop = asyncio.get_running_loop()
        out = []
        for start in (0, 4):
            items = [(i, loop.create_future()) for i in range(start, start + 4)]
            await batcher.answer_batch(items)
            out.append(await asyncio.wait_for(asyncio.gather(*(f for _, f in items), return_exceptions=True), 30))
        return out

    first, second = asyncio.run(go())
    assert [x[:2] for x in first[0::2]] == [(0, 0), (0, 2)]  # the saver's answers stand
    assert all(isinstance(e, RuntimeError) for e in first[1::2])
    assert [x[:2] for x in second] == [(0, 4), (1, 5), (0, 6), (1, 7)]


def test_a_fused_batch_larger_than_a_model_batch_runs_in_chunks_with_the_base_refilled():
    """40 requests at a model batch of 8: the saver runs 8 at a time, the base runs full batches
    of 8 survivors (not 4 per chunk), and every answer equals the engine's over all 40 at once."""
    log = []
    saver, base = Slow(0.99, 0.0, log), Slow(1.0, 0.0, log)
    batcher = FusedBatcher([saver, base], [0.9], base_from=1, batch_size=8)

    got = answer_all(batcher, 40)
    assert batcher.sizes == {40: 1}
    assert batcher.stage_sizes == [{8: 5}, {8: 2, 4: 1}]  # 20 odd survivors: 8, 8 and the tail of 4
    want = {}
    engine.run([saver, base], [0.9], 40, lambda idx: list(idx), lambda i, idx, p, c: want.update(
        {int(j): (i, int(pj), float(cj)) for j, pj, cj in zip(idx, p, c)}), batch_size=40)
    assert [g[:3] for g in got] == [want[i] for i in range(40)]


def two_slow_stages(plan, device="cpu", only=None) -> dict:
    """A ServiceSpec factory (``tests.test_serve_answering:two_slow_stages``): a saver sure of even ids only, and a base."""
    return {0: Slow(0.95, 0.0, []), 1: Slow(1.0, 0.0, [])}


class Handle:
    """A stage deployment's handle: ``classify.remote(item)`` answers like ``Slow`` on one item."""

    def __init__(self, stage):
        self.stage, self.deployment_name = stage, stage.name
        self.classify = self

    def remote(self, item):
        async def answer():
            pred, conf, carry = self.stage([item[0]], None)
            return int(pred[0]), float(conf[0]), carry
        return answer()


@pytest.mark.parametrize("layout", ["fused", "per-stage"])
def test_each_layouts_answerer_owns_its_thresholds_and_adapt_moves_them_through_one_method(layout):
    """The ingress asks one answerer whatever the layout: same answers, same six fields, and the
    threshold ``--adapt`` sets is the one the next request meets."""
    from tinysaver.serve.fused import FusedAnswerer
    from tinysaver.serve.per_stage import WalkAnswerer

    plan = ServiceSpec(stage_plan(("s", "b"), (0.9,)), ServeOptions(layout=layout, batch_wait_timeout_s=0.0),
                factory="tests.test_serve_answering:two_slow_stages")

    async def go():
        if layout == "fused":
            a = FusedAnswerer(plan, lambda: 0)
        else:
            a = WalkAnswerer(plan, [Handle(st) for st in two_slow_stages(plan).values()], (Dead,))
        out = [await a.answer(2), await a.answer(3)]
        a.set_threshold(0, 0.99)  # above the saver's 0.95: the base answers the even id too
        out.append(await a.answer(2))
        together = await a.answer_all([4, 5], time.perf_counter())
        return a, out, together

    a, out, together = asyncio.run(go())
    assert [o[:3] for o in out] == [(0, 2, pytest.approx(0.95)), (1, 3, 0.0), (1, 2, 1.0)]
    assert all(len(o) == 6 and o[5] is None for o in out + together) and a.thresholds == [0.99]
    assert [o[0] for o in together] == [1, 1]
