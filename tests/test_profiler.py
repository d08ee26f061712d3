import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.helpers import run_here
from tinysaver.profiler import profile
from tinysaver.zoo import ZooError, load_zoo


def test_profile_writes_a_complete_zoo(tiny_zoo_cfg, tmp_path):
    root = tmp_path / "zoos"
    path = profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    zoo = load_zoo("tiny", root)
    assert set(zoo.models) == {"test_efficientnet", "test_resnet", "test_vit"}
    for key, m in zoo.models.items():
        assert m["status"] == "measured"
        assert m["params"] > 0 and m["flops"] > 0 and m["macs"] * 2 == pytest.approx(m["flops"], rel=0.2)
        assert set(m["latency"]["table"]) == {"bs1", "bs2"}
        assert m["latency"]["threads"] >= 1 and m["latency"]["torch"]
        p = zoo.predictions(key, "a")
        assert len(p.pred) == 12 and np.all((p.conf > 0) & (p.conf <= 1))
        assert m["accuracy"]["a"] == pytest.approx(p.accuracy)
        assert p.topk_idx.shape == (12, 2) and np.array_equal(p.topk_idx[:, 0], p.pred)
    # each model keeps its own preprocessing
    assert zoo.models["test_vit"]["preprocess"] != zoo.models["test_resnet"]["preprocess"]
    assert zoo.splits["a"]["skipped_unreadable"] == 1
    df = zoo.table()
    assert list(df["model"]) == sorted(zoo.models, key=lambda k: zoo.models[k]["flops"])
    assert dict(zip(df["model"], df["input_px"])) == {k: m["preprocess"]["input_size"][-1] for k, m in zoo.models.items()}
    assert not list(path.rglob(".*.tmp*"))


def test_profile_refuses_other_samples_in_same_split(tiny_zoo_cfg, tmp_path, image_folder):
    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[:1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    (image_folder / "class1" / "img2.png").unlink()
    from tinysaver.models import ModelSpec

    tiny_zoo_cfg.models = [ModelSpec("test_resnet", num_classes=3, input_size=32)]
    # one image fewer: found by listing, before anything is decoded or run
    with pytest.raises(ZooError, match=r"split '\w+' of zoo tiny was profiled on \d+ samples of imagefolder:.*, this "
                                       r"run asks for \d+; profile into a new zoo \(--zoo NAME\), or pass --restart"):
        profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)


def test_a_resume_onto_other_inputs_stops_and_restart_starts_afresh(tiny_zoo_cfg, tmp_path):
    """A resumed profile compares each split's dataset and size, and each finished model's settings,
    with what the zoo holds: a difference is one line naming it; a matching resume runs nothing."""
    import dataclasses

    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[:1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    said = []
    profile(tiny_zoo_cfg, root, progress=False, log=said.append)  # the same inputs: nothing recomputed
    assert said == [f"{tiny_zoo_cfg.models[0].key}: already profiled, skipping"]
    first = dict(tiny_zoo_cfg.splits)
    split, uri = next(iter(first.items()))
    moved = dataclasses.replace(tiny_zoo_cfg, splits={**first, split: uri + "/"})
    with pytest.raises(ZooError, match=f"split '{split}' of zoo tiny was profiled on {uri}, not {uri}/"):
        profile(moved, root, progress=False, log=lambda s: None)
    fewer = dataclasses.replace(tiny_zoo_cfg, limit=2)
    with pytest.raises(ZooError, match=r"asks for 2 \(--limit 2\)"):
        profile(fewer, root, progress=False, log=lambda s: None)
    spec = tiny_zoo_cfg.models[0]
    other = dataclasses.replace(tiny_zoo_cfg, models=[dataclasses.replace(spec, input_size=48)])
    with pytest.raises(ZooError, match=f"model '{spec.key}' of zoo tiny was profiled with input_size=32, this run "
                                       "gives input_size=48"):
        profile(other, root, progress=False, log=lambda s: None)
    # --restart: the zoo is profiled again on the new inputs, and its manifest says so
    said.clear()
    profile(dataclasses.replace(fewer, restart=True), root, progress=False, log=said.append)
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("tiny", root)
    assert all(s["samples"] + s["skipped_unreadable"] == 2 for s in zoo.splits.values())
    assert not any("already profiled" in line for line in said)


def test_resume_after_kill_recomputes_nothing(tiny_zoo_cfg, tmp_path, capsys):
    """Kill a real `tinysaver profile` run after its first model, restart it, and check the result."""
    root = tmp_path / "zoos"
    cfg = {
        "zoo": "tiny",
        "splits": tiny_zoo_cfg.splits,
        "models": [{"name": n, "num_classes": 3, "input_size": 32, "label": f"{n}_{i}"}
                   for i, n in enumerate(["test_efficientnet", "test_resnet", "test_convnext", "test_efficientnet"])],
        "batch_sizes": [1, 4],
        "latency_min_run_time": 0.1,
    }
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tinysaver.cli", "--root", str(root), "profile", "--config", str(cfg_file), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = root / "tiny" / "zoo.yaml"
    deadline = time.time() + 240
    done_before_kill = []
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file():
            m = yaml.safe_load(manifest.read_text()) or {}
            done_before_kill = list((m.get("models") or {}))
            if done_before_kill:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(done_before_kill) < 4
    first = done_before_kill[0]
    pred_file = root / "tiny" / "preds" / first / "a.npz"
    stamp = pred_file.stat().st_mtime_ns
    out = run_here(capsys, *cmd[3:])  # the restart runs here: only the killed run needs its own process
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{first}: already profiled, skipping" in out.stdout
    assert pred_file.stat().st_mtime_ns == stamp  # not recomputed
    zoo = load_zoo("tiny", root)
    assert len(zoo.measured()) == 4
    for key in zoo.models:
        for split in ("a", "b"):
            zoo.predictions(key, split)  # every file complete and matching its split
    assert not [p for p in (root / "tiny").rglob("*") if ".tmp" in p.name]


def test_profile_repairs_a_truncated_prediction_file(tiny_zoo_cfg, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(tiny_zoo_cfg, models=tiny_zoo_cfg.models[:1], splits={"a": tiny_zoo_cfg.splits["a"]})
    root = tmp_path / "zoos"
    profile(cfg, root, progress=False, log=lambda s: None)
    key = cfg.models[0].key
    before = load_zoo("tiny", root).predictions(key, "a")
    f = root / "tiny" / "preds" / key / "a.npz"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ZooError, match=f"{key}/a.npz: cannot read it as .npz"):
        load_zoo("tiny", root).predictions(key, "a")
    logs = []
    profile(cfg, root, progress=False, log=logs.append)
    assert not any("already profiled" in s for s in logs)  # the broken model is not taken as done
    after = load_zoo("tiny", root).predictions(key, "a")
    assert np.array_equal(after.pred, before.pred)


def test_a_failed_profile_leaves_no_empty_zoo(tiny_zoo_cfg, tmp_path):
    import dataclasses

    from tinysaver.models import CheckpointError, ModelSpec

    broken = ModelSpec("test_resnet", num_classes=3, checkpoint=str(tmp_path / "missing.safetensors"))
    cfg = dataclasses.replace(tiny_zoo_cfg, models=[broken])
    root = tmp_path / "zoos"
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        profile(cfg, root, progress=False, log=lambda s: None)
    assert not (root / "tiny").exists()
    from tinysaver.zoo import list_zoos

    assert list_zoos(root) == []


def test_relative_checkpoints_resolve_from_the_config_file(tmp_path, image_folder):
    from safetensors.torch import save_file

    from tinysaver.models import ModelSpec, create_model
    from tinysaver.profiler import ProfileConfig

    (tmp_path / "ck").mkdir()
    m = create_model(ModelSpec("test_resnet", num_classes=3, input_size=32))
    save_file({k: v.contiguous() for k, v in m.module.state_dict().items()}, str(tmp_path / "ck" / "r.safetensors"))
    (tmp_path / "configs").mkdir()
    conf = tmp_path / "configs" / "c.yaml"
    conf.write_text(yaml.safe_dump({"zoo": "rel", "splits": {"a": f"imagefolder:{image_folder}"},
                                    "models": [{"name": "test_resnet", "num_classes": 3, "input_size": 32,
                                                "checkpoint": "../ck/r.safetensors"}]}))
    cfg = ProfileConfig.from_yaml(conf)
    assert cfg.models[0].checkpoint == str((tmp_path / "ck" / "r.safetensors").resolve())
    conf.write_text(conf.read_text().replace("../ck/", "./ck/"))
    with pytest.raises(ValueError, match="read from the config file's folder"):
        ProfileConfig.from_yaml(conf)


def test_zoo_rebuild_checks_the_recorded_preprocessing(tiny_zoo_cfg, tmp_path):
    import dataclasses
    import warnings

    from tinysaver.zoo import atomic_write_yaml

    cfg = dataclasses.replace(tiny_zoo_cfg, models=tiny_zoo_cfg.models[1:2], splits={"a": tiny_zoo_cfg.splits["a"]})
    root = tmp_path / "zoos"
    profile(cfg, root, progress=False, log=lambda s: None)
    key = cfg.models[0].key
    assert load_zoo("tiny", root).load_model(key).preprocess.crop_pct  # unchanged: loads
    zoo = load_zoo("tiny", root)
    zoo.manifest["models"][key]["preprocess"]["crop_pct"] = 0.5  # as if timm's config had changed since
    atomic_write_yaml(zoo.path / "zoo.yaml", zoo.manifest)
    with pytest.raises(ZooError, match=r"crop_pct: recorded 0.5, now .*accept-preprocess-change"):
        load_zoo("tiny", root).load_model(key)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = load_zoo("tiny", root).load_model(key, accept_preprocess_change=True)
    assert model.preprocess.crop_pct != 0.5 and any("crop_pct" in str(x.message) for x in w)
