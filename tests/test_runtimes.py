"""Inference backends: export once, reuse the cache, agree with eager, and run the cascade exactly."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from tests.helpers import need_package, offline_reference, split_threshold, tiny
from tinysaver.cascade import Cascade, CascadeError
from tinysaver.runtimes import (
    BackendError,
    agreement,
    check_backend,
    make_runner,
    runner_with_fallback,
)
from tinysaver.transforms import prepare_batch

ONNX_BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 24 + i, 30 - i), dtype=torch.uint8, generator=g) for i in range(13)]


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_export_is_cached_and_agrees_with_eager(backend, tmp_path, images):
    need_package(backend)
    m = tiny("test_efficientnet", input_size=32)
    first = make_runner(m, backend, cache_dir=tmp_path)
    assert not first.cached and first.export_path.is_file() and first.export_s > 0
    stamp = os.stat(first.export_path).st_mtime_ns
    again = make_runner(m, backend, cache_dir=tmp_path)
    assert again.cached and again.export_s == 0 and again.export_path == first.export_path
    assert os.stat(again.export_path).st_mtime_ns == stamp  # loaded, not exported again
    for bs in (1, 5, 13):  # dynamic batch: shrinking changes it at every stage
        a = agreement(m, again, images, batch_size=bs)
        assert a["top1_agreement"] == 1.0 and a["max_conf_diff"] < 1e-4 and a["samples"] == 13
    with torch.no_grad():
        m.module.conv_stem.weight.add_(0.1)  # other weights: another key, another export
    assert make_runner(m, backend, cache_dir=tmp_path).export_path != first.export_path


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_cascade_on_a_backend_is_exact_against_its_offline_policy(backend, tmp_path, images):
    need_package(backend)
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    cas = Cascade(stages, [0.0], backend=backend, cache_dir=tmp_path)
    assert cas.backends == [backend, backend]
    every = cas.predict(images, all_stages=True)  # every stage on every sample, on this backend
    t, near = split_threshold(every.stage_conf[0])
    assert near == 0
    cas.thresholds = [t]
    ref = Cascade(stages, [t], backend=backend, cache_dir=tmp_path).predict(images, shrink=False)
    for bs in (1, 4):
        res = cas.predict(images, batch_size=bs)
        assert np.array_equal(res.stage, ref.stage) and np.array_equal(res.pred, ref.pred)
    assert 0 < (ref.stage == 0).sum() < len(images)
    eager = offline_reference(stages, [t], images)  # the backend's decisions match eager's here too
    assert np.array_equal(ref.stage, eager[2]) and np.array_equal(ref.pred, eager[0])


def test_one_backend_per_stage(tmp_path, images):
    need_package("onnxruntime")
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    cas = Cascade(stages, [0.5], backend=["onnxruntime", "eager"], cache_dir=tmp_path)
    assert cas.backends == ["onnxruntime", "eager"]
    with pytest.raises(ValueError, match="one per stage"):
        Cascade(stages, [0.5], backend=["eager"])


def test_threads_per_stage_reach_the_runtimes(tmp_path, images):
    need_package("onnxruntime")
    need_package("openvino")
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    every = Cascade(stages, [0.0], backend="onnxruntime", cache_dir=tmp_path).predict(images, all_stages=True)
    t, near = split_threshold(every.stage_conf[0])
    assert near == 0
    cas = Cascade(stages, [t], backend=["onnxruntime", "openvino"], threads=[1, 2], cache_dir=tmp_path)
    assert [r.threads for r in cas._runners] == [1, 2]  # as the runtimes themselves report them
    assert [r.threads for r in Cascade(stages, [0.5], backend="openvino", threads=1,
                                        cache_dir=tmp_path)._runners] == [1, 1]
    res = cas.predict(images, batch_size=4)  # thread counts change no decision
    assert np.array_equal(res.stage, (every.stage_conf[0] < t).astype(int))
    assert np.array_equal(res.pred[res.stage == 1], every.stage_pred[1][res.stage == 1])
    with pytest.raises(ValueError, match="one per stage"):
        Cascade(stages, [0.5], backend="onnxruntime", threads=[1, 2, 1])
    with pytest.raises(ValueError, match="integers ≥ 1"):
        Cascade(stages, [0.5], backend="onnxruntime", threads=0)
    with pytest.raises(ValueError, match="torch.set_num_threads"):
        Cascade(stages, [0.5], backend=["onnxruntime", "eager"], threads=[1, torch.get_num_threads() + 1])


def test_onnxruntime_spins_only_when_asked(tmp_path, images):
    need_package("onnxruntime")
    m = tiny("test_resnet", input_size=40)
    quiet, spinning = (make_runner(m, "onnxruntime", cache_dir=tmp_path, spin=s) for s in (False, True))
    assert (quiet.spin, spinning.spin) == (False, True)  # as the sessions report their settings
    x = prepare_batch(images[:4], m.preprocess)
    assert torch.allclose(quiet(x), spinning(x), atol=1e-5)  # spinning changes timing, not answers
    with pytest.raises(BackendError, match="onnxruntime backend only"):
        make_runner(m, "eager", spin=True)
    stages = [tiny("test_efficientnet", input_size=32), m]
    cas = Cascade(stages, [0.5], backend="onnxruntime", spin=[False, True], cache_dir=tmp_path)
    assert [r.spin for r in cas._runners] == [False, True]  # one per stage reaches the sessions
    with pytest.raises(CascadeError, match="onnxruntime stages only"):
        Cascade(stages, [0.5], backend=["onnxruntime", "eager"], spin=[False, True], cache_dir=tmp_path)
    with pytest.raises(CascadeError, match="one per stage"):
        Cascade(stages, [0.5], backend="onnxruntime", spin=[True], cache_dir=tmp_path)


def test_missing_or_unknown_backend_names_the_extra(monkeypatch):
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        check_backend("tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BackendError, match=r"pip install 'tinysaver\[onnx\]'"):
        check_backend("onnxruntime")


class Svd(torch.nn.Module):
    """A classifier whose op (linalg_svdvals) has no ONNX export."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.linalg.svdvals(x.flatten(2)))


def test_failed_export_names_model_and_op_and_falls_back_only_when_asked(tmp_path):
    need_package("onnxruntime")
    from tinysaver.models import LoadedModel, Preprocess

    m = LoadedModel("svd-net", Svd().eval(), Preprocess((3, 8, 8)), 3)
    with pytest.raises(BackendError, match=r"svd-net: cannot export to ONNX \(op aten::linalg_svdvals\)"):
        make_runner(m, "onnxruntime", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="running svd-net on eager"):
        r = runner_with_fallback(m, "onnxruntime", "eager", cache_dir=tmp_path)
    assert r.backend == "eager" and not list(tmp_path.glob("*.onnx"))  # no half-written export left


def test_compile_backend_agrees_with_eager(images):
    """torch.compile (inductor) on a small conv net: compiling a timm model takes minutes on 2 cores."""
    from tinysaver.models import LoadedModel, Preprocess

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    m = LoadedModel("small-conv", net, Preprocess((3, 16, 16)), 3)
    r = make_runner(m, "compile")
    assert r.backend == "compile"
    for bs in (1, 6):
        a = agreement(m, r, images[:6], batch_size=bs)
        assert a["top1_agreement"] == 1.0 and a["max_conf_diff"] < 1e-4


def test_latency_only_profile_adds_backend_rows_and_costs(tiny_zoo_cfg, tmp_path, capsys):
    need_package("onnxruntime")
    import dataclasses
    import hashlib

    from safetensors.torch import save_file

    from tinysaver.cli import main
    from tinysaver.models import create_model
    from tinysaver.profiler import profile
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    specs = []
    for spec in tiny_zoo_cfg.models[:2]:  # a zoo's models carry their weights: save them as checkpoints
        f = tmp_path / f"{spec.key}.safetensors"
        save_file({k: v.contiguous() for k, v in create_model(spec).module.state_dict().items()}, str(f))
        specs.append(dataclasses.replace(spec, checkpoint=str(f)))
    cfg = dataclasses.replace(tiny_zoo_cfg, models=specs)
    root = tmp_path / "zoos"
    profile(cfg, root, progress=False, log=lambda s: None)
    preds = sorted((root / "tiny" / "preds").rglob("*.npz"))
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in preds]
    assert main(["profile", "--latency-only", "--zoo", "tiny", "--root", str(root), "--backends",
                 "eager,onnxruntime", "--batch-sizes", "1,3", "--latency-seconds", "0.01", "--quiet"]) == 0
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in preds] == digest  # predictions untouched
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit) as e:
            main(["profile", "--latency-only", "--zoo", "tiny", "--root", str(root), "--latency-seconds", bad])
        assert e.value.code == 2 and "--latency-seconds" in capsys.readouterr().err
    zoo = load_zoo("tiny", root)
    for key, m in zoo.models.items():
        for b in ("eager", "onnxruntime"):
            row = m["backends"][b]
            assert row["exact"] and set(row["latency"]["table"]) == {"bs1", "bs3"}
            assert row["latency"]["device"] == "cpu" and row["latency"]["threads"] >= 1
            assert set(row["agreement"]) == {"a", "b"} and row["agreement"]["a"]["top1_agreement"] == 1.0
    assert {"ms_bs1_onnxruntime", "ms_bs3_eager"} <= set(zoo.table().columns)
    keys = sorted(zoo.models, key=lambda k: zoo.models[k]["backends"]["onnxruntime"]["latency"]["table"]["bs1"]["ms_per_batch"])
    sel = select(zoo, keys[-1], SelectorConfig(cost="latency:cpu:bs1:onnxruntime", criterion="bounded", tolerance=100)).best
    assert sel.cost_metric == "latency:cpu:bs1:onnxruntime"
    assert sel.cost_base == zoo.models[keys[-1]]["backends"]["onnxruntime"]["latency"]["table"]["bs1"]["ms_per_batch"]
    with pytest.raises(ValueError, match="no latency on backend 'openvino'.*--backends openvino"):
        select(zoo, keys[-1], SelectorConfig(cost="latency:cpu:bs1:openvino"))


def test_malloc_advice_only_where_it_helps(monkeypatch):
    from tinysaver.runtimes import malloc_advice

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "LD_PRELOAD=" in malloc_advice(32, [224, 260])
    assert "LD_PRELOAD=" in malloc_advice(1, [224])  # it paid at batch 1 too
    assert malloc_advice(32, [32, 64]) is None      # small images
    assert malloc_advice(32, [224], "cuda") is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert malloc_advice(32, [224]) is None         # already on
    monkeypatch.delenv("LD_PRELOAD")
    assert malloc_advice(32, [224], backends=["onnxruntime", "openvino"]) is None  # OpenVINO crashes under it


def test_openvino_refuses_a_preloaded_tcmalloc(monkeypatch, tmp_path):
    need_package("openvino")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    with pytest.raises(BackendError, match="OpenVINO crashes when tcmalloc is preloaded"):
        make_runner(tiny("test_resnet", input_size=32), "openvino", cache_dir=tmp_path)


def test_openvino_runs_announced_batch_sizes_on_fixed_shapes_unpinned(tmp_path, images):
    need_package("openvino")
    m = tiny("test_efficientnet", input_size=32)
    r = make_runner(m, "openvino", cache_dir=tmp_path)
    ov_model = r.fn
    # pinned threads made two 1-thread models in a pipelined cascade share one core
    assert ov_model.dynamic.get_property("ENABLE_CPU_PINNING") is False
    x = prepare_batch(images, m.preprocess)
    want = ov_model.dynamic(x.numpy())[0]
    assert np.allclose(r(x[:4]).numpy(), want[:4], atol=1e-5) and ov_model.static == {}  # nothing compiled unasked
    for n in (4, 1, 2, 3, 4, 5):  # 4 again: kept, and now the most recent
        r.expect_batch(n)
    assert list(ov_model.static) == [2, 3, 4, 5]  # the four most recently announced; 1 was dropped
    assert list(ov_model.static[2].input(0).get_partial_shape()) == [2, 3, 32, 32]
    assert ov_model.static[2].get_property("ENABLE_CPU_PINNING") is False
    for n in (1, 2, 5, 13):  # fixed-shape or dynamic, the same logits
        assert np.allclose(r(x[:n]).numpy(), want[:n], atol=1e-5)
    make_runner(m, "eager").expect_batch(4)  # a no-op elsewhere
    for bad in (0, -3, 2.0, True):
        with pytest.raises(BackendError, match="integer ≥ 1"):
            r.expect_batch(bad)
    r.expect_batch(np.int64(4))  # numpy's integers are batch sizes too
    from tinysaver.measure import measure_latency

    measure_latency(r, m.preprocess.input_size, [7], min_run_time=0.01)
    assert 7 in ov_model.static  # the profiler times the shape a cascade at that batch size runs
    cas = Cascade([m], [], backend="openvino", cache_dir=tmp_path)
    cas.predict(images, batch_size=6)
    cas.predict(images[:3], batch_size=6)
    assert list(cas._runners[0].fn.static) == [6]  # a cascade announces its batch size; a short call compiles nothing


def test_the_first_export_says_so_once_with_its_cache_path(tmp_path, capsys):
    need_package("onnxruntime")
    from tinysaver.runtimes import make_runner

    m = tiny("test_resnet")
    make_runner(m, "onnxruntime", cache_dir=tmp_path)
    first = capsys.readouterr().err
    assert f"exporting {m.key} for onnxruntime once (cached at {tmp_path}" in first
    make_runner(m, "onnxruntime", cache_dir=tmp_path)
    assert "exporting" not in capsys.readouterr().err  # the cache answers: nothing to say
