"""The service's parts without Ray: body parsing, decoding, tokens, the request walk with dying
replicas, the batcher, the fused batcher's early answers, the audit monitor, options and plans."""
import asyncio
import json
import time

import numpy as np
import pytest
import torch

from tests.helpers import png_bytes
from tinysaver import engine
from tinysaver.errors import CascadeError, ServeError
from tinysaver.serve import AuditMonitor, BadRequest, Plan, ServeOptions
from tinysaver.serve.batching import Batcher
from tinysaver.serve.http import check_token, decode, decode_all, ndjson_as_ready, read_files
from tinysaver.serve.walk import FusedBatcher, StageWalk
from tinysaver.stageplan import StagePlan


def stage_plan(names: tuple, thresholds: tuple) -> StagePlan:
    """A plan of ``names`` (zoo models nobody loads) on the default backend."""
    n = len(names)
    return StagePlan("z", names, names, thresholds, (1.0,) * n, ("eager",) * n, (None,) * n, (False,) * n)


class FakeRequest:
    """What the routes read of a starlette Request: headers, the body stream and the form."""

    def __init__(self, body: bytes, ctype: str, length: bool = True):
        self.headers = {"content-type": ctype, **({"content-length": str(len(body))} if length else {})}
        self._raw = body

    async def stream(self):
        for i in range(0, len(self._raw), 7):
            yield self._raw[i:i + 7]

    async def form(self):
        from starlette.requests import Request

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", self.headers["content-type"].encode())]}

        async def receive():
            return {"type": "http.request", "body": self._body, "more_body": False}

        return await Request(scope, receive).form()


def run(coro):
    return asyncio.run(coro)


def multipart(files, boundary="XyZ"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="{n}"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + d + b"\r\n" for i, (n, d) in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_bodies_raw_multipart_and_every_refusal_in_one_sentence():
    pytest.importorskip("starlette")
    img = png_bytes(np.zeros((8, 8), np.uint8))
    assert run(read_files(FakeRequest(img, "image/png"), False, 10_000)) == [("body", img)]
    body, ctype = multipart([("a.png", img), ("b.png", img)])
    assert [n for n, _ in run(read_files(FakeRequest(body, ctype), True, 10_000))] == ["a.png", "b.png"]
    cases = [(FakeRequest(body, ctype), False, 10_000, 400, "/predict takes one image, the form holds 2 files"),
             (FakeRequest(img, "image/png"), False, 10, 413, "over the limit of 10 bytes"),
             (FakeRequest(img, "image/png", length=False), False, 10, 413, "over the limit"),
             (FakeRequest(img, "text/plain"), False, 10_000, 415, "application/octet-stream"),
             (FakeRequest(img, "image/png"), True, 10_000, 415, "multipart/form-data"),
             (FakeRequest(b"abc", "multipart/form-data"), False, 10_000, 400, "malformed multipart body (Missing boundary"),
             (FakeRequest(b"--XyZ\r\nno headers here\r\n\r\nabc\r\n--XyZ--", "multipart/form-data; boundary=XyZ"), False,
              10_000, 400, "malformed multipart body"),
             (FakeRequest(b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"), False, 10_000, 400, "no file")]
    for req, many, limit, status, words in cases:
        with pytest.raises(BadRequest) as e:
            run(read_files(req, many, limit))
        assert e.value.status == status and words in e.value.reason and "\n" not in e.value.reason, e.value.reason


def test_decoding_refusals_name_the_problem_not_the_decoder():
    from PIL import Image
    import io

    for data, status, words in [(b"", 400, "empty body"), (b"GIF89a broken", 400, "not a usable image"),
                                (png_bytes(np.zeros((8, 8), np.uint8))[:30], 400, "not a usable image")]:
        with pytest.raises(BadRequest) as e:
            decode(data, 1000)
        assert e.value.status == status and words in e.value.reason and "0x" not in e.value.reason
    buf = io.BytesIO()
    Image.new("L", (400, 300)).save(buf, format="PNG")
    with pytest.raises(BadRequest) as e:
        decode(buf.getvalue(), 100_000)
    assert e.value.status == 413 and "400 × 300 pixels is over the cap" in e.value.reason
    assert decode(buf.getvalue(), None).shape == (1, 300, 400)


def test_a_token_is_required_when_set():
    check_token({}, None)
    check_token({"authorization": "Bearer s3cret"}, "s3cret")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        with pytest.raises(BadRequest) as e:
            check_token(headers, "s3cret")
        assert e.value.status == 401


class Dead(Exception):
    pass


def test_a_streamed_batch_writes_each_answer_when_it_is_ready():
    """/predict/batch's lines come in the order the answers finish (here: 2, 0, 3, 1), each one
    written before the next answer is ready, not in the order the images were sent."""
    async def main():
        events = [asyncio.Event() for _ in range(4)]

        async def answer(i):
            await events[i].wait()
            return {"index": i}

        stream = ndjson_as_ready(answer(i) for i in range(4))
        got = []
        for i in (2, 0, 3, 1):  # only answer i can finish: a stream in index order would wait here
            events[i].set()
            got.append(json.loads(await asyncio.wait_for(stream.__anext__(), 5))["index"])
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return got

    assert run(main()) == [2, 0, 3, 1]


def test_answers_that_finish_together_stream_as_one_chunk_in_the_order_asked():
    async def main():
        gate = asyncio.Event()

        async def answer(i):
            if i in (1, 3):
                await gate.wait()
            return {"index": i}

        stream = ndjson_as_ready(answer(i) for i in range(4))
        chunks = [await asyncio.wait_for(stream.__anext__(), 5)]
        gate.set()
        chunks.append(await asyncio.wait_for(stream.__anext__(), 5))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return [[json.loads(line)["index"] for line in c.splitlines()] for c in chunks]

    assert run(main()) == [[0, 2], [1, 3]]


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
    assert run(walk.answer("easy", 5.0)) == (0, 0, 0.95, "carry0")
    assert run(walk.answer("hard", 5.0)) == (1, 10, 0.1, "carry1")
    assert walk.retried == 2 and calls.count(1) == 3
    seen = []  # --adapt reads the saver's answer for requests the base answered
    assert run(walk.answer("hard", 5.0, seen)) == (1, 10, 0.1, "carry1") and seen == [(0, 0.1), (10, 0.1)]

    def hang(i, item):
        return asyncio.sleep(60)

    slow = StageWalk(hang, ["s", "b"], [0.9], base_from=1, retries=5, dead=(Dead,))
    t0 = time.monotonic()
    with pytest.raises(BadRequest) as e:
        run(slow.answer("x", 0.2))
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
    assert run(savers.base_answer("img", 0, "carry0", 5.0)) == 102 and calls == [(2, "carry0")]
    calls.clear()
    parts = StageWalk(call, ["saver", "p1", "p2"], [0.9, 0.9], base_from=1, retries=0)
    assert run(parts.base_answer("img", 1, "carry1", 5.0)) == 102 and calls == [(2, "carry1")]
    calls.clear()
    assert run(parts.base_answer("img", 0, "carry0", 5.0)) == 102 and calls == [(1, "carry0"), (2, "carry1")]


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

    got = run(go())
    base_end = next(t for kind, name, t in log if kind == "end" and name == base.name)
    for i, ((stage, pred, conf), t) in got.items():
        assert pred == i and stage == (0 if i % 2 == 0 else 1)
        if stage == 0:  # answered while the base was still running on the odd ones
            assert t < base_end - 0.5, (i, base_end - t)
    assert batcher.sizes == {6: 1} and batcher.stage_sizes == [{6: 1}, {3: 1}]  # the base ran the odd three
    assert run(batcher.base_batch([1, 2, 3])) == [1, 2, 3]  # the base alone, for the audit
    assert batcher.timed == 0  # items without an arrival time are not timed


def answer_all(batcher: FusedBatcher, n: int) -> list:
    """Requests 0 … n-1 answered by ``batcher`` as one batch: their answers, in order."""
    async def go():
        loop = asyncio.get_running_loop()
        items = [(i, loop.create_future()) for i in range(n)]
        await batcher.answer_batch(items)
        return [await f for _, f in items]

    return run(go())


def test_a_fused_batcher_for_adapt_gives_the_savers_answer_with_every_request():
    """--adapt needs the saver's class and confidence for requests the base answered, too."""
    log = []
    batcher = FusedBatcher([Slow(0.99, 0.0, log), Slow(1.0, 0.0, log)], [0.9], base_from=1, first=True)

    got = answer_all(batcher, 4)
    assert [g[:2] for g in got] == [(0, 0), (1, 1), (0, 2), (1, 3)]
    saver = [(p, round(c, 6)) for _, _, _, (p, c) in got]
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

    run(go())
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

    assert all(isinstance(e, RuntimeError) for e in run(go()))


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

    first, second = run(go())
    assert [x[:2] for x in first[0::2]] == [(0, 0), (0, 2)]  # the saver's answers stand
    assert all(isinstance(e, RuntimeError) for e in first[1::2])
    assert [x[:2] for x in second] == [(0, 4), (1, 5), (0, 6), (1, 7)]


def test_streamed_lines_say_what_went_wrong_and_time_out_at_the_deadline():
    """``line`` turns each outcome into its line: a result, a refusal, a failure, or no answer in time."""
    async def main():
        loop = asyncio.get_running_loop()
        ok, refused, failed, never = (loop.create_future() for _ in range(4))
        ok.set_result(7)
        refused.set_exception(BadRequest(400, "not a usable image"))
        failed.set_exception(RuntimeError("boom"))

        def line(k, outcome):
            return {"k": k, "got": outcome if isinstance(outcome, int) else type(outcome).__name__}

        chunks = [c async for c in ndjson_as_ready([ok, refused, failed, never], line, timeout_s=0.2)]
        return [[json.loads(x) for x in c.splitlines()] for c in chunks], never.cancelled()

    chunks, cancelled = run(main())
    assert chunks == [[{"k": 0, "got": 7}, {"k": 1, "got": "BadRequest"}, {"k": 2, "got": "RuntimeError"}],
                      [{"k": 3, "got": "TimeoutError"}]]
    assert cancelled  # the engine skips an answer nobody waits for


def test_a_batch_of_bodies_decodes_each_and_keeps_the_refusal_of_a_bad_one():
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    out = decode_all([good, b"junk", b""], None)
    assert tuple(out[0].shape) == (3, 8, 8)
    assert [type(x).__name__ for x in out[1:]] == ["BadRequest", "BadRequest"] and out[2].status == 400


def feed(m, rng, n, exit_p, disagree_p):
    for _ in range(n):
        early = rng.random() < exit_p
        audit = early and rng.random() < m.fraction
        rec = m.request(early, audit)
        if audit:
            m.audited(rec, rng.random() < disagree_p)


def test_the_audit_monitor_separates_certified_uncertain_and_drift():
    import random

    rng = random.Random(1)
    m = AuditMonitor(fraction=1.0, delta=0.1, tolerance_points=5.0)
    assert m.state == "uncertain" and m.view()["more_requests"] > 0
    feed(m, rng, 400, exit_p=0.7, disagree_p=0.0)
    assert m.state == "certified" and m.view()["loss_points"]["upper"] <= 5.0 and m.changes[0][1:] == ("uncertain",
                                                                                                      "certified")
    feed(m, rng, 400, exit_p=0.7, disagree_p=0.5)  # the traffic shifts: a third of all answers now differ
    assert m.state == "drift" and m.view()["loss_points"]["lower"] > 5.0 and m.alarm
    few = AuditMonitor(fraction=0.05, delta=0.1, tolerance_points=1.0)
    feed(few, rng, 300, exit_p=0.7, disagree_p=0.0)
    v = few.view()  # 300 clean requests at 5 % audits cannot certify 1 point: uncertain, never drift
    assert v["state"] == "uncertain" and v["more_requests"] > 1000 and v["more_audits"] > 0
    off = AuditMonitor(fraction=0.0, delta=0.1, tolerance_points=1.0)
    off.request(True)
    assert off.state == "off" and off.view()["loss_points"] is None
    rec = few.request(True, audit=True)
    assert few.view()["pending"] == 1
    few.dropped()
    assert few.view()["pending"] == 0 and few.view()["dropped"] == 1 and rec[1] is None


def test_checking_after_every_request_keeps_false_drift_below_delta():
    """Anytime validity, seeded: streams whose loss sits exactly at the tolerance, checked after
    every request, call drift in at most δ of them (plus sampling slack)."""
    import random

    delta, streams, alarms = 0.1, 300, 0
    for seed in range(streams):
        rng = random.Random(seed)
        m = AuditMonitor(fraction=0.5, delta=delta, tolerance_points=10.0)
        feed(m, rng, 600, exit_p=0.5, disagree_p=0.2)  # loss = 0.5 × 0.2 = 10 points: the hardest null
        alarms += any(to == "drift" for _, _, to in m.changes)
    assert alarms / streams <= delta + 3 * (delta * (1 - delta) / streams) ** 0.5, alarms


# --adapt, simulated: saver confidences c ~ U(0, 1); the saver disagrees with the base with
# probability 0.3 (1 − c) on clean traffic (0.6 points lost at the calibrated 0.8), and 0.5 below
# c = 0.97 after a shift (8.6 points at 0.8; 1.1 at 0.95, within the 2-point tolerance)
def _clean(c):
    return 0.3 * (1 - c)


def _shifted(c):
    return np.where(c < 0.97, 0.5, 0.02)


def _true_loss(t, p) -> float:
    """Points lost against the base at threshold t, for c ~ U(0, 1)."""
    cs = np.linspace(0, 1, 200_001)
    return 100 * float(np.mean((cs >= t) * p(cs)))


def _replay(adapter, regimes, rng):
    """(early, lost) per request, each answered at the threshold in use when it arrived."""
    from tinysaver.serve.adapt import replay

    out = []
    for n, p in regimes:
        c = rng.random(n)
        dis = rng.random(n) < p(c)
        for ci, di in zip(c.tolist(), dis.tolist()):
            early = replay(adapter, int(di), ci, 0, rng.random)  # the base says 0
            out.append((early, early and di))
    return np.array(out)


def test_adapt_raises_the_threshold_on_drift_and_lowers_it_only_on_fresh_audits():
    from tinysaver.serve.adapt import ThresholdAdapter

    fraction, tol, t0 = 0.2, 2.0, 0.8
    fixed = _true_loss(t0, _shifted)
    certified = []
    lowered_after = 0
    for seed in range(8):
        ad = ThresholdAdapter(t0, fraction, 0.1, tol, seed=seed)
        out = _replay(ad, [(5000, _clean), (10000, _shifted), (20000, _clean)], np.random.default_rng(seed))
        sw = ad.switches
        assert all(s["request"] > 5000 for s in sw), sw  # nothing moves on clean traffic
        assert sw and sw[0]["why"] == "drift" and sw[0]["to"] > t0, sw  # the shift raises it
        post = out[5000:15000]
        assert 100 * post[:, 1].mean() < fixed / 2 and post[:, 0].mean() > 0.02  # less lost, exits kept
        for s in sw:
            if s["why"].startswith("certified"):  # certified on fresh audits: truly within the tolerance
                regime = _shifted if s["request"] <= 15000 else _clean
                certified.append(_true_loss(s["to"], regime) <= tol)
        lowered_after += ad.threshold is not None and ad.threshold <= 0.9
    assert certified and all(certified)
    assert lowered_after >= 3, lowered_after  # back near the calibrated threshold once clean traffic returns


def test_an_audit_from_an_ended_epoch_is_ignored():
    from tinysaver.serve.adapt import ThresholdAdapter

    ad = ThresholdAdapter(0.8, 1.0, 0.1, 1.0)
    pending = ad.request(True, True, 1, 0.85, None)
    ad.audited(ad.request(True, True, 1, 0.95, None), True)  # a confident disagreement: drift at once
    # the epoch's one audit lost points at 0.95 and above, none at 0.98: the lowest grid point that fits
    assert ad.switches == [{"request": 2, "from": 0.8, "to": 0.98, "why": "drift"}]
    assert ad.threshold == 0.98 and ad.state == "uncertain" and ad.monitor.n == 0
    ad.audited(pending, True)  # the old epoch's audit returns: the new monitor never saw its request
    assert ad.monitor.n == 0 and ad.monitor.hits == 0
    view = ad.view()
    assert view["adapt"]["threshold"] == ad.threshold and view["adapt"]["switch_count"] == 1


def test_options_choose_the_layout_and_plans_are_checked():
    assert ServeOptions().resolved_layout() == "fused"
    assert ServeOptions(num_gpus=[0, 1]).resolved_layout() == "per-stage"  # per-stage resources given
    assert ServeOptions(replicas=[1, 2]).resolved_layout() == "per-stage"
    assert ServeOptions(layout="per-stage").resolved_layout() == "per-stage"
    with pytest.raises(ServeError, match="--layout must be one of fused, per-stage"):
        ServeOptions(layout="both")
    with pytest.raises(ServeError, match="--max-body-mb must be > 0"):
        ServeOptions(max_body_bytes=0)
    o = ServeOptions()
    with pytest.raises(CascadeError, match="1 saver\\(s\\) need as many thresholds, got 0"):
        stage_plan(("a", "b"), ())
    with pytest.raises(CascadeError, match="must lie in \\[0, 1\\]"):
        stage_plan(("a", "b"), (1.5,))
    with pytest.raises(CascadeError, match="a model cannot be its own saver"):
        stage_plan(("a", "a"), (0.5,))
    p = Plan(stage_plan(("a", "b"), (0.5,)), o)
    with pytest.raises(Exception):  # frozen: a deployment's plan cannot change under it
        p.stages.base_from = 0
    assert p.stages.base_from == 1  # the last stage alone is the base unless told
    with pytest.raises(ServeError, match="--adapt retunes from audits: give --audit"):
        ServeOptions(adapt=True)
    adapt = ServeOptions(adapt=True, audit=0.05)
    assert Plan(stage_plan(("a", "b"), (0.5,)), adapt).options.adapt
    with pytest.raises(ServeError, match="one saver before its base; this policy has 3 stages"):
        Plan(stage_plan(("a", "b", "c"), (0.5, 0.5)), adapt)
    with pytest.raises(ServeError, match=r"2 stages \(ESN exits\)"):
        Plan(stage_plan(("a", "b"), (0.5,)), adapt, factory="esn.serve:stages")


def test_the_builder_types_serve_run_arguments_and_refuses_bad_ones():
    from tinysaver.serve.builders import _typed, app

    got = _typed({"resources": '{"node2": 1}', "replicas": "2", "num_cpus": "0.5", "backend": "onnxruntime,eager",
                  "layout": "fused", "max_pixels": "1000", "accept_preprocess_change": "true"})
    assert got == {"resources": {"node2": 1}, "replicas": 2, "num_cpus": 0.5, "backend": ["onnxruntime", "eager"],
                   "layout": "fused", "max_pixels": 1000, "accept_preprocess_change": True}
    with pytest.raises(ServeError, match="num_cpus='lots': not a valid value"):
        _typed({"num_cpus": "lots"})
    from tinysaver.selector import SelectorConfig

    sel = _typed({"tolerance": "1.5", "max_stages": "3", "label_free": "true", "cost": "latency:cpu:bs1"}, SelectorConfig)
    assert sel == {"tolerance": 1.5, "max_stages": 3, "label_free": True, "cost": "latency:cpu:bs1"}
    with pytest.raises(ServeError, match="tolerance='abc': not a valid value"):  # not a bare ValueError
        _typed({"tolerance": "abc"}, SelectorConfig)
    with pytest.raises(ServeError, match=r"unknown argument\(s\) \['colour'\]"):
        app({"zoo": "fashion-mnist", "base": "resnet10t", "colour": "red"})


def test_a_replica_no_node_can_hold_is_named_with_what_it_lacks():
    from tinysaver.serve.builders import replica_needs, unschedulable

    o = ServeOptions(layout="per-stage", num_cpus=0.25, num_gpus=[0, 1], resources=[{}, {"node2": 1}])
    plan = Plan(stage_plan(("s", "b"), (0.5,)), o)
    needs = replica_needs(plan)
    assert needs["the base stage (b)"] == {"CPU": 0.25, "GPU": 1.0, "node2": 1.0}
    assert needs["the saver stage (s)"] == {"CPU": 0.25}
    one_node = [{"Alive": True, "Resources": {"CPU": 2.0, "node2": 1.0}}]
    assert unschedulable(needs, one_node) == "the base stage (b) needs GPU=1; the largest node of this cluster has GPU=0"
    assert unschedulable(needs, [*one_node, {"Alive": True, "Resources": {"CPU": 4, "GPU": 1, "node2": 2}}]) is None
    fused = Plan(stage_plan(("s", "b"), (0.5,)), ServeOptions(resources={"nowhere": 1}))
    assert unschedulable(replica_needs(fused), one_node).startswith("the fused replica (every stage) needs nowhere=1")


def test_the_terminal_watch_prints_each_state_change_and_threshold_change_once(monkeypatch, capsys):
    import io
    import json
    import urllib.request

    from tinysaver.serve.lifecycle import AuditWatch

    base = {"requests": 10, "tolerance_points": 1.0, "loss_points": {"lower": 0.0, "upper": 3.0},
            "more_requests": 900}
    sw = {"request": 40, "from": 0.9, "to": 0.98, "why": "drift"}
    bodies = [{"state": "uncertain"}, {"state": "uncertain"}, {"state": "drift"},
              {"state": "uncertain", "adapt": {"switch_count": 1, "switches": [sw]}},
              {"state": "uncertain", "adapt": {"switch_count": 2, "switches": [sw, {**sw, "from": 0.98, "to": None}]}}]
    replies = iter(json.dumps({"audit": {**base, **b}}).encode() for b in bodies)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(next(replies)))
    watch = AuditWatch("http://127.0.0.1:1/healthz", every_s=0.0)
    for _ in bodies:
        watch.poll()
    err = capsys.readouterr().err.splitlines()
    assert err == ["tinysaver: audit drift after 10 requests: loss against the base in [0.00, 3.00] points, "
                   "tolerance 1.00",
                   "tinysaver: adapt: threshold 0.9 → 0.98 after 40 requests (drift)",  # and a fresh audit:
                   "tinysaver: audit uncertain after 10 requests: loss against the base in [0.00, 3.00] points, "
                   "tolerance 1.00; about 900 more requests would certify it",
                   "tinysaver: adapt: threshold 0.98 → ∞ (the base alone) after 40 requests (drift)"], err


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

    results, batches, sizes = run(go())
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

    results, batches = run(go())
    assert results == [10 * i for i in range(17)]
    assert batches == [[0, 1, 2, 3], list(range(4, 14)), list(range(14, 17))]
    with pytest.raises(ServeError, match="max_cut"):
        Batcher(lambda x: x, 4, 0.0, max_cut=3)


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
    assert got == [want[i] for i in range(40)]


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

    first, second = run(go())
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

    out, batches = run(go())
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

    alone, pair, batches = run(go())
    assert alone == 10 and pair == [20, 30] and batches == [[1], [2, 3]]


def test_the_grpc_method_is_registered_under_its_name_and_replies_with_bytes():
    """What Serve's gRPC proxy gets from ``add_servicer``, and what its replica serializes."""
    grpc = pytest.importorskip("grpc")
    from tinysaver.serve import grpc_api

    class Server:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    class Servicer:
        def Predict(self, data, context):  # noqa: N802
            return grpc_api.reply({"class": 3})

    server = Server()
    grpc_api.add_servicer(Servicer(), server)
    [handler] = server.handlers
    details = type("Details", (), {"method": grpc_api.METHOD, "invocation_metadata": ()})()
    method = handler.service(details)
    assert method is not None and method.request_deserializer is None  # the replica gets the raw bytes
    assert json.loads(method.unary_unary(b"png", None).SerializeToString()) == {"class": 3}
    assert all(hasattr(grpc.StatusCode, name) for name in grpc_api.STATUS.values())


def two_slow_stages(plan, device="cpu", only=None) -> dict:
    """A Plan factory (``tests.test_serve_parts:two_slow_stages``): a saver sure of even ids only, and a base."""
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
    """The ingress asks one answerer whatever the layout: same answers, same five fields, and the
    threshold ``--adapt`` sets is the one the next request meets."""
    from tinysaver.serve.answerers import FusedAnswerer, WalkAnswerer

    plan = Plan(stage_plan(("s", "b"), (0.9,)), ServeOptions(layout=layout, batch_wait_timeout_s=0.0),
                factory="tests.test_serve_parts:two_slow_stages")

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

    a, out, together = run(go())
    assert [o[:3] for o in out] == [(0, 2, pytest.approx(0.95)), (1, 3, 0.0), (1, 2, 1.0)]
    assert all(len(o) == 5 for o in out + together) and a.thresholds == [0.99]
    assert [o[0] for o in together] == [1, 1]
