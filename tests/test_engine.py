"""The one engine: stages with carries, shrinking, refill and pipelining, on toy stages whose every
call is recorded (no model needed)."""
import numpy as np
import pytest
import torch

from tinysaver import engine
from tinysaver.errors import UsageError


class Toy:
    """Stage ``k``: confidence of sample j is ``conf[k][j]``; hands on {"seen": stages so far, "id"}."""

    def __init__(self, k, conf, log, needs_images=True):
        self.k, self.conf, self.log, self.needs_images = k, conf, log, needs_images
        self.name = f"s{k}"

    def __call__(self, images, carry):
        ids = images.clone() if images is not None else carry["id"]
        if carry is not None:  # the carry arrives with its own samples, rows in order
            assert torch.equal(carry["id"], ids), (self.k, carry["id"], ids)
            assert all(len(s) == self.k for s in carry["seen"].tolist())
        self.log.append(("run", self.k, ids.tolist()))
        seen = torch.full((len(ids), self.k + 1), self.k) if carry is None else \
            torch.cat([carry["seen"], torch.full((len(ids), 1), self.k)], 1)
        return ids % 7, torch.as_tensor(self.conf[self.k][ids.numpy()]), {"id": ids, "seen": seen}


def toy_run(n=23, S=3, batch_size=4, refill=True, pipeline=False, seed=0):
    rng = np.random.default_rng(seed)
    conf = rng.random((S, n)).astype(np.float32)
    log, answered = [], {}
    stages = [Toy(k, conf, log, needs_images=k == 0) for k in range(S)]

    def on_answer(i, idx, pred, conf_):
        log.append(("answer", i, idx.tolist()))
        for j, p, c in zip(idx.tolist(), pred.tolist(), conf_.tolist()):
            assert j not in answered  # each sample answered once
            answered[j] = (i, p, c)

    engine.run(stages, [0.5] * (S - 1), n, lambda idx: torch.as_tensor(idx), on_answer, batch_size=batch_size,
               refill=refill, pipeline=pipeline)
    want = {}
    for j in range(n):  # the rule, sample by sample
        i = next((k for k in range(S - 1) if conf[k, j] >= 0.5), S - 1)
        want[j] = (i, j % 7, float(conf[i, j]))
    return log, answered, want


@pytest.mark.parametrize("refill, pipeline", [(True, False), (False, False), (True, True), (False, True)])
def test_every_path_gives_the_rule_sample_by_sample(refill, pipeline):
    for bs in (1, 4, 64):
        log, answered, want = toy_run(batch_size=bs, refill=refill, pipeline=pipeline)
        assert answered == want, (bs, refill, pipeline)


def test_refill_fills_later_batches_and_pipeline_forms_the_same_ones():
    seq, _, _ = toy_run(n=64, batch_size=8, refill=True)
    sizes = [len(e[2]) for e in seq if e[0] == "run" and e[1] == 2]
    assert all(s == 8 for s in sizes[:-1]) and 0 < sizes[-1] <= 8  # only the last one is short
    no, _, _ = toy_run(n=64, batch_size=8, refill=False)
    assert len([e for e in no if e[0] == "run" and e[1] == 2]) > len(sizes)  # each chunk's few leftovers
    pipe, _, _ = toy_run(n=64, batch_size=8, refill=True, pipeline=True)
    runs = sorted((e[1], tuple(e[2])) for e in pipe if e[0] == "run")
    assert runs == sorted((e[1], tuple(e[2])) for e in seq if e[0] == "run")


def test_a_batch_is_answered_before_its_survivors_run_on():
    log, _, _ = toy_run(n=16, batch_size=4, refill=False)
    for k, event in enumerate(log):
        if event[0] == "run" and event[1] > 0:
            # the batch these survivors came from was answered (for those it answered) before
            prev = [e for e in log[:k] if e[0] == "answer" and e[1] == event[1] - 1]
            assert prev and set(event[2]).isdisjoint(prev[-1][2])


def test_a_failing_stage_is_raised_and_no_thread_is_left():
    import threading

    class Boom:
        name, needs_images = "boom", False

        def __call__(self, images, carry):
            raise RuntimeError("stage failed")

    conf = np.zeros((2, 10), np.float32)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="stage failed"):
        engine.run([Toy(0, conf, []), Boom()], [0.5], 10, lambda idx: torch.as_tensor(idx),
                   lambda *a: None, batch_size=3, pipeline=True)
    assert threading.active_count() == before


def test_carries_split_and_join_in_nested_structures():
    c = {"x": torch.arange(10).view(5, 2), "lps": [torch.arange(5.0)], "prev": None, "np": np.arange(5)}
    half = engine.carry_take(c, np.array([True, False, True, False, True]))
    assert half["x"].tolist() == [[0, 1], [4, 5], [8, 9]] and half["prev"] is None
    back = engine.carry_cat([half, engine.carry_take(c, np.array([1, 3]))])
    assert back["lps"][0].tolist() == [0, 2, 4, 1, 3] and back["np"].tolist() == [0, 2, 4, 1, 3]


def test_per_stage_takes_one_value_or_exactly_one_each():
    assert engine.per_stage("eager", 3, "backend") == ["eager"] * 3
    assert engine.per_stage([1, 2], 2, "threads") == [1, 2]
    with pytest.raises(UsageError, match="one per stage"):
        engine.per_stage([1, 2], 3, "threads")
    with pytest.raises(UsageError, match="2 stages need 1 thresholds"):
        engine.run([Toy(0, np.zeros((1, 1)), []), Toy(1, np.zeros((2, 1)), [])], [], 1, lambda i: i, lambda *a: None)
