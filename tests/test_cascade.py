import csv
import io
import json
import threading
import warnings

import numpy as np
import pytest
import torch

from tests.helpers import offline_reference, split_threshold, tiny
from tinysaver.cascade import Cascade, CascadeError


@pytest.fixture(scope="module")
def mixed_images():
    g = torch.Generator().manual_seed(0)
    imgs = []
    for i in range(23):
        c = 1 if i % 5 == 0 else 3
        h, w = 20 + i, 40 - i // 2
        imgs.append(torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g))
    return imgs


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_shrinking_matches_offline_reference(mixed_images, batch_size):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40), tiny("test_vit")]
    t0, near0 = split_threshold(offline_reference(stages, [0, 0], mixed_images)[1])  # splits the batch
    t1, near1 = split_threshold(offline_reference(stages[1:], [0], mixed_images)[1], 0.3)
    assert near0 + near1 <= 2  # few samples sit in the margin, and only they may flip
    thresholds = [t0, t1]
    ref = offline_reference(stages, thresholds, mixed_images)
    all_conf = [offline_reference([m], [], mixed_images)[1] for m in stages[:2]]
    away = np.ones(len(mixed_images), bool)
    for c, t in zip(all_conf, thresholds):
        away &= np.abs(c - t) >= 1e-5
    cas = Cascade(stages, thresholds)
    for shrink, refill in ((True, True), (True, False), (False, True)):
        res = cas.predict(mixed_images, batch_size=batch_size, shrink=shrink, refill=refill)
        assert np.array_equal(res.stage[away], ref[2][away])
        assert np.array_equal(res.pred[away], ref[0][away])
        # fp32 kernels may pick other blockings at other batch sizes: allow float noise only
        np.testing.assert_allclose(res.conf[away], ref[1][away], rtol=1e-5, atol=1e-6)
    assert away.sum() >= len(mixed_images) - 2
    assert 0 < (ref[2] == 0).sum() < len(mixed_images) and (ref[2] == 1).any()  # every exit is exercised


def test_refill_runs_later_stages_on_full_batches(mixed_images):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40), tiny("test_vit")]
    t, near = split_threshold(offline_reference(stages, [0, 0], mixed_images)[1], 0.4)
    assert near == 0
    thresholds = [t, 0.0]  # about 60% of samples go on past the first saver
    seen = {i: [] for i in range(3)}
    for i, m in enumerate(stages):
        m.module.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(len(args[0])))
    ref = offline_reference(stages, thresholds, mixed_images)
    for refill in (True, False):
        for v in seen.values():
            v.clear()
        res = Cascade(stages, thresholds).predict(mixed_images, batch_size=4, refill=refill)
        assert np.array_equal(res.stage, ref[2]) and np.array_equal(res.pred, ref[0])
        survivors = int((ref[2] > 0).sum())
        assert sum(seen[1]) == survivors and sum(seen[0]) == len(mixed_images)
        if refill:  # every batch is full except possibly each stage's last one
            assert all(b == 4 for b in seen[1][:-1]) and len(seen[1]) == -(-survivors // 4)
        else:
            assert len(seen[1]) > -(-survivors // 4)  # per-chunk leftovers make more, smaller batches
    assert not seen[2]  # a threshold of 0 answers everything at the second stage


@pytest.mark.parametrize("batch_size,refill", [(1, True), (4, True), (4, False), (64, True)])
def test_pipeline_runs_the_sequential_batches_in_threads(mixed_images, batch_size, refill):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40), tiny("test_vit")]
    t0, near0 = split_threshold(offline_reference(stages, [0, 0], mixed_images)[1], 0.4)
    t1, near1 = split_threshold(offline_reference(stages[1:], [0], mixed_images)[1], 0.8)  # the base runs too
    assert near0 + near1 <= 2
    seen = {i: [] for i in range(3)}  # per stage: (batch size, thread name, inference mode) of each call
    for i, m in enumerate(stages):
        m.module.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(
            (len(args[0]), threading.current_thread().name, torch.is_inference_mode_enabled())))
    cas = Cascade(stages, [t0, t1])
    runs = {}
    for pipeline in (False, True):
        for v in seen.values():
            v.clear()
        runs[pipeline] = cas.predict(mixed_images, batch_size=batch_size, refill=refill, pipeline=pipeline), \
            {i: list(v) for i, v in seen.items()}
    (seq, seq_seen), (pipe, pipe_seen) = runs[False], runs[True]
    assert all(seq_seen[i] and [b for b, *_ in seq_seen[i]] == [b for b, *_ in pipe_seen[i]] for i in range(3))
    # the same batches give the same bits
    assert np.array_equal(seq.stage, pipe.stage) and (seq.stage == 2).any()
    assert np.array_equal(seq.pred, pipe.pred) and np.array_equal(seq.conf, pipe.conf)
    assert {name for _, name, _ in pipe_seen[1]} == {"tinysaver-stage-1"}
    assert {name for _, name, _ in pipe_seen[2]} == {"tinysaver-stage-2"}
    assert all(mode for i in range(3) for _, _, mode in pipe_seen[i])  # no autograd in the stage threads


def test_a_pipeline_of_eager_stages_on_several_torch_threads_warns(mixed_images):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    cas = Cascade(stages, [0.5])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match=r"torch.set_num_threads\(1\)"):
            cas.predict(mixed_images, batch_size=4, pipeline=True)
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cas.predict(mixed_images, batch_size=4, pipeline=True)  # one thread each: nothing to say
            torch.set_num_threads(2)
            cas.predict(mixed_images, batch_size=4)  # not pipelined: nothing to say
    finally:
        torch.set_num_threads(before)


def test_a_failing_pipeline_stage_raises_and_leaves_no_thread(mixed_images):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    calls = []

    def fail_on_second_call(mod, args):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise RuntimeError("the base broke")
    stages[1].module.register_forward_pre_hook(fail_on_second_call)
    with pytest.raises(RuntimeError, match="the base broke"):
        Cascade(stages, [1.0]).predict(mixed_images, batch_size=2, pipeline=True)
    assert len(calls) == 2  # the stage stopped at its failure
    assert not [t for t in threading.enumerate() if t.name.startswith("tinysaver-stage")]
    with pytest.raises(CascadeError, match="shrinking path"):
        Cascade(stages, [0.5]).predict(mixed_images, pipeline=True, all_stages=True)


def test_all_stages_and_exit_ratios(mixed_images):
    stages = [tiny("test_efficientnet"), tiny("test_resnet")]
    res = Cascade(stages, [0.0]).predict(mixed_images, all_stages=True)
    assert (res.stage == 0).all() and res.exit_ratios == [1.0, 0.0]
    assert res.stage_pred.shape == (2, len(mixed_images))
    assert np.array_equal(res.stage_pred[0], res.pred)
    res = Cascade(stages, [1.0]).predict(mixed_images)
    assert (res.stage == 1).all() and res.exit_ratios == [0.0, 1.0]  # random 3-class softmax never reaches 1.0


def test_bad_cascades_rejected(mixed_images):
    a, b = tiny("test_efficientnet", n=3), tiny("test_resnet", n=5)
    with pytest.raises(CascadeError, match="class spaces"):
        Cascade([a, b], [0.5])
    with pytest.raises(CascadeError, match=r"\[0, 1\]"):
        Cascade([a, tiny("test_resnet")], [1.5])
    with pytest.raises(CascadeError, match="thresholds"):
        Cascade([a, tiny("test_resnet")], [])
    with pytest.raises(CascadeError, match="empty"):
        Cascade([a], []).predict([])


def test_compare_with_base_reports_both_paths(mixed_images):
    from tinysaver.cascade import compare_with_base

    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    labels = np.arange(len(mixed_images)) % 3
    t, near = split_threshold(offline_reference(stages[:1], [], mixed_images)[1])
    assert near == 0
    ref = offline_reference(stages, [t], mixed_images)
    rows = compare_with_base(Cascade(stages, [t]), mixed_images, labels, batch_sizes=(1, 4), repeats=1)
    assert [r["batch"] for r in rows] == [1, 4]
    base_alone = offline_reference(stages[1:], [], mixed_images)[0]
    for r in rows:
        assert r["cascade_img_s"] > 0 and r["cascade_norefill_img_s"] > 0 and r["base_img_s"] > 0
        assert r["exit_ratio"] == pytest.approx((ref[2] == 0).mean())
        assert r["cascade_acc"] == pytest.approx((ref[0] == labels).mean())
        assert r["base_acc"] == pytest.approx((base_alone == labels).mean())  # the base really ran alone
        # the derived columns are the measured ones combined, not figures of their own
        assert r["speedup"] == pytest.approx(r["cascade_img_s"] / r["base_img_s"])
        assert r["of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    with pytest.raises(CascadeError, match="saver → base"):
        compare_with_base(Cascade(stages[:1], []), mixed_images, labels)


def test_classify_files_streams_every_file_once_with_its_answer_or_its_reason(tmp_path, mixed_images):
    """The loop `tinysaver infer` runs, as a library function: each readable file gets the answer
    `predict` gives its decoded image, in the source's order; a broken file gets its reason and the
    run goes on; the tally counts both."""
    from PIL import Image

    from tinysaver.budget import InputBudget
    from tinysaver.cascade import FileTally, classify_files
    from tinysaver.decoding import decode_image
    from tinysaver.sources import paths_source

    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    for i, img in enumerate(mixed_images[:9]):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "05.png").write_bytes(b"not a png")
    src = paths_source([str(tmp_path)])
    cas = Cascade(stages, [0.5])
    tally = FileTally(cas.stage_names)
    got = list(classify_files(cas, src, InputBudget(None, [s.preprocess for s in stages]), 4, tally=tally))
    assert sorted(p for p, _ in got) == sorted(src.ids) and len(got) == 9
    bad = [(p, r) for p, r in got if isinstance(r, str)]
    assert [p for p, _ in bad] == [str(tmp_path / "05.png")] and tally.unreadable == 1
    good = [(p, r) for p, r in got if not isinstance(r, str)]
    ref = cas.predict([decode_image(open(p, "rb").read()) for p, _ in good]).rows()
    assert [r["class"] for _, r in good] == [r["class"] for r in ref]
    assert tally.answered == 8 and sum(tally.counts) == 8
    assert abs(sum(tally.summary()["exit_ratio"].values()) - 1) < 1e-3


def test_open_files_resolves_the_policy_once_and_streams_what_the_command_prints(tmp_path, monkeypatch):
    """`tinysaver infer`'s whole set-up as one library call: the policy asked for, the stages it
    plans, the files found (a skipped one said), the answers streamed and the summary counted."""
    import os

    from tinysaver.errors import UsageError
    from tinysaver.infer import open_files
    from tinysaver.selector import PolicyRequest
    from tinysaver.zoo import load_zoo
    from tests.helpers import png_bytes

    rng = np.random.default_rng(7)
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    (tmp_path / "3.png").write_bytes(b"not a png")
    os.mkfifo(tmp_path / "pipe.png")  # a FIFO with an image's name is skipped, and said
    zoo = load_zoo("fashion-mnist")
    run = open_files(zoo, PolicyRequest(base="resnet10t"), [tmp_path], batch_size=2, threads=[1])
    assert run.selection.base == "resnet10t" and len(run.cascade.stages) == len(run.selection.thresholds) + 1
    assert [w for w in run.warnings if "pipe.png" in w] and any("saver:" in n for n in run.notes)
    got = dict(run.rows())
    assert sorted(got) == sorted(str(tmp_path / f"{i}.png") for i in range(4)) and isinstance(got[str(tmp_path / "3.png")], str)
    summary = run.summary()
    assert summary["images"] == 3 and summary["unreadable"] == 1 and summary["skipped"] == 1
    assert summary["thresholds"] == run.selection.thresholds
    for fmt in ("csv", "jsonl"):  # what the command writes: a row per image, the unreadable file on the log
        out, log = io.StringIO(), io.StringIO()
        again = open_files(zoo, PolicyRequest(base="resnet10t"), [tmp_path], batch_size=2, threads=[1])
        assert again.write(out, fmt, log, progress=False) == 3
        lines = out.getvalue().splitlines()
        rows = list(csv.DictReader(lines)) if fmt == "csv" else [json.loads(line) for line in lines]
        assert {r["path"]: int(r["class"]) for r in rows} == {p: r["class"] for p, r in got.items() if isinstance(r, dict)}
        assert log.getvalue().splitlines() == [f"tinysaver: cannot read {tmp_path / '3.png'}: {got[str(tmp_path / '3.png')]}"]
    with pytest.raises(UsageError, match="format must be csv or jsonl"):
        run.write(io.StringIO(), "xml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images found"):
        open_files(zoo, PolicyRequest(base="resnet10t"), [empty], threads=[1])
