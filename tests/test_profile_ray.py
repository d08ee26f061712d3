"""Profiling on Ray: the same zoo as a local run, retried after a worker kill, resumed after a driver kill."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, TIMM_RESULTS, image_folder, need, need_package, run_here, tiny_profile_config
from tinysaver.models import ModelSpec
from tinysaver.profiler import ProfileConfig, profile
from tinysaver.zoo import load_zoo

pytestmark = [pytest.mark.ray]  # starts Ray: select with -m 'not ray' for a quick run

SHARDS = 4


@pytest.fixture(scope="module")
def ray_local():
    need_package("ray")
    import ray

    from tinysaver.ray_local import set_local_ray_env

    set_local_ray_env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """2 tiny models on 25 synthetic images (one unreadable), 4 per batch: 4 shards of ≤ 8 rows."""
    root = tmp_path_factory.mktemp("rayimgs")
    dataset = image_folder(root, classes=3, per_class=8, seed=3)
    (root / "c1" / "9_broken.png").write_bytes(b"truncated")
    return tiny_profile_config("rayzoo", dataset, classes=3)


@pytest.fixture(scope="module")
def local_zoo(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    profile(cfg, root, progress=False, log=lambda s: None)
    return load_zoo("rayzoo", root)


def assert_same_zoo(ray_zoo, local_zoo):
    """Identical sample ids, fingerprints, predictions and FLOPs; confidences within 1e-5, which
    covers the float noise of other thread counts in the Ray workers."""
    assert ray_zoo.splits == local_zoo.splits  # fingerprints, sample counts, unreadable counts, class names
    for key in local_zoo.models:
        r, l = ray_zoo.model(key), local_zoo.model(key)
        assert r["profiled_on"] == "ray" and "latency" not in r
        for field in ("flops", "macs", "params", "preprocess", "num_classes", "accuracy"):
            assert r[field] == l[field], field
        for split in local_zoo.splits:
            pr, pl = ray_zoo.predictions(key, split), local_zoo.predictions(key, split)
            assert list(pr.ids) == list(pl.ids)
            assert np.array_equal(pr.pred, pl.pred)
            np.testing.assert_allclose(pr.conf, pl.conf, atol=1e-5)


def test_shard_bounds_cover_every_row_once_on_batch_edges():
    from tinysaver.profile_ray import shard_bounds

    for n, shards, align in [(25, 4, 4), (10_000, 7, 64), (3, 8, 1), (0, 4, 4)]:
        b = shard_bounds(n, shards, align)
        assert len(b) <= shards
        assert [i for a, z in b for i in range(a, z)] == list(range(n))
        assert all(a % align == 0 for a, _ in b)


def test_ray_profile_equals_local(ray_local, cfg, local_zoo, tmp_path):
    from tinysaver.profile_ray import profile_on_ray

    counts = profile_on_ray(cfg, tmp_path, shards=SHARDS, progress=False, log=lambda s: None)
    assert counts == {"units": 2 * SHARDS, "run": 2 * SHARDS, "reused": 0, "skipped": 0, "retries": 0, "workers_lost": 0, "merged": 2}
    assert_same_zoo(load_zoo("rayzoo", tmp_path), local_zoo)
    assert not (tmp_path / "rayzoo.staging").exists()  # merged shards are cleaned up
    # a second run finds the models done and computes nothing
    again = profile_on_ray(cfg, tmp_path, shards=SHARDS, progress=False, log=lambda s: None)
    assert again["run"] == 0 and again["skipped"] == 2 * SHARDS


def test_a_killed_worker_is_retried_and_counted(ray_local, cfg, local_zoo, tmp_path):
    from tinysaver.profile_ray import profile_on_ray

    killed = []

    def kill_first(unit, pid):
        if not killed:  # the worker that just finished a unit dies; its next units need a restart
            # set_local_ray_env: workers run at our priority, not at Ray's nice 15
            assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    counts = profile_on_ray(cfg, tmp_path, shards=SHARDS, progress=False, log=lambda s: None, on_unit=kill_first)
    assert killed and counts["retries"] >= 1 and counts["merged"] == 2
    assert counts["run"] == 2 * SHARDS
    assert_same_zoo(load_zoo("rayzoo", tmp_path), local_zoo)


def test_a_killed_driver_resumes_with_only_the_missing_units(ray_local, cfg, local_zoo, tmp_path):
    from tinysaver.profile_ray import profile_on_ray, staging_dir

    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import ray
from tinysaver.models import ModelSpec
from tinysaver.profiler import ProfileConfig
from tinysaver.profile_ray import profile_on_ray
ray.init(address={ray_local.get_runtime_context().gcs_address!r}, log_to_driver=False)
cfg = ProfileConfig(**{{**{cfg.__dict__!r}, "models": [ModelSpec(**m) for m in {[m.__dict__ for m in cfg.models]!r}]}})
done = []
def die_after_three(unit, pid):
    done.append(unit)
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # the driver dies with units still to run
profile_on_ray(cfg, {str(tmp_path)!r}, shards={SHARDS}, progress=False, log=lambda s: None, on_unit=die_after_three)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    staged = staging_dir(tmp_path / "rayzoo")
    time.sleep(2)  # a unit in flight when the driver died may still land; count after that
    n_staged = len(list(staged.rglob("*.npz")))
    assert 3 <= n_staged < 2 * SHARDS
    counts = profile_on_ray(cfg, tmp_path, shards=SHARDS, progress=False, log=lambda s: None)
    assert counts["reused"] == n_staged and counts["run"] == 2 * SHARDS - n_staged
    assert_same_zoo(load_zoo("rayzoo", tmp_path), local_zoo)


def test_bad_config_fails_before_any_task_starts(ray_local, cfg, tmp_path, monkeypatch):
    import dataclasses

    import tinysaver.profile_ray as pr

    def no_tasks(*args, **kwargs):
        raise AssertionError("a task was about to start")

    monkeypatch.setattr(pr, "RayScheduler", no_tasks)
    bad_model = dataclasses.replace(cfg, models=[ModelSpec("resnet_does_not_exist")])
    with pytest.raises(ValueError, match="resnet_does_not_exist"):
        pr.profile_on_ray(bad_model, tmp_path, progress=False)
    bad_data = dataclasses.replace(cfg, splits={"val": f"imagefolder:{tmp_path / 'nowhere'}"})
    with pytest.raises(ValueError, match="not a folder"):
        pr.profile_on_ray(bad_data, tmp_path, progress=False)
    bad_ckpt = dataclasses.replace(cfg, models=[ModelSpec("test_resnet", checkpoint=str(tmp_path / "w.pth"))])
    with pytest.raises(ValueError, match="does not exist"):
        pr.profile_on_ray(bad_ckpt, tmp_path, progress=False)
    with pytest.raises(ValueError, match="GPU"):
        pr.profile_on_ray(cfg, tmp_path, gpus_per_task=1, progress=False)
    with pytest.raises(ValueError, match="shards"):
        pr.profile_on_ray(cfg, tmp_path, shards=0, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written either


def test_plan_for_the_paper_pool():
    need(TIMM_RESULTS.is_dir(), "timm's results tables (../shared/data/timm-results)")
    from tinysaver.profile_cost import format_profile_cost, profile_cost

    pool = ProfileConfig.from_yaml(REPO / "zoo_index" / "configs" / "imagenet-paper-pool.yaml")
    from tinysaver.catalog import PAPER_POOL

    assert [m.name for m in pool.models] == [f"{a}.{t}" for a, t in PAPER_POOL.items()]  # the catalog's exact tags
    plans = {g: profile_cost(pool, g, root=REPO / "zoo_index") for g in (1, 8, 64)}
    one = plans[1]
    assert len(one.rows) == len(PAPER_POOL) and all(r.samples == 50_000 for r in one.rows)
    assert abs(one.wall_hours - one.gpu_hours) < 1e-9  # one GPU runs everything in turn
    for g in (8, 64):  # more GPUs: less wall time, never below a perfect split, same GPU-hours
        p = plans[g]
        assert p.gpu_hours == pytest.approx(one.gpu_hours)
        assert one.gpu_hours / g - 1e-12 <= p.wall_hours < one.wall_hours
    r50 = next(r for r in one.rows if r.model == "resnet50.tv_in1k")
    assert r50.how == "published" and r50.img_size == 224 and r50.gmacs == pytest.approx(4.11)
    assert "GPU-hours" in format_profile_cost(one)
    # a model the table lacks at its size is scaled by GMACs (which grow with the pixel count)
    odd = ProfileConfig("x", {"val": "imagenet:/none"}, [ModelSpec("resnet50.tv_in1k", input_size=300)],
                        split_sizes={"val": 1000})
    [row] = profile_cost(odd, 1, root=REPO / "zoo_index").rows
    assert row.how == "GMACs-scaled" and row.gmacs == pytest.approx(4.11 * (300 / 224) ** 2, rel=1e-3)
    assert row.img_per_s < r50.img_per_s
    unknown = ProfileConfig("x", {"val": "imagenet:/none"}, [ModelSpec("net_nobody_listed")], split_sizes={"val": 10})
    with pytest.raises(ValueError, match="no GMACs known"):
        profile_cost(unknown, 1, root=REPO / "zoo_index")
    with pytest.raises(ValueError, match="available: rtx4090"):
        profile_cost(pool, 1, gpu_type="h100", root=REPO / "zoo_index")


@pytest.mark.parametrize("flag", ["--cost", "--plan"])  # --plan: the old name still works
def test_cost_cli_prints_without_running(tmp_path, capsys, monkeypatch, flag):
    need(TIMM_RESULTS.is_dir(), "timm's results tables (../shared/data/timm-results)")
    monkeypatch.chdir(tmp_path)
    out = run_here(capsys, "profile", "--config", str(REPO / "zoo_index" / "configs" / "imagenet-paper-pool.yaml"),
                   flag, "--gpus", "8", "--root", str(REPO / "zoo_index"))
    assert out.returncode == 0, out.stderr
    assert "on 8 × rtx4090" in out.stdout and out.stdout.count("| published |") >= 40
    assert not (tmp_path / "zoo_index").exists()
    assert yaml.safe_load((REPO / "zoo_index" / "configs" / "imagenet-paper-pool.yaml").read_text())["zoo"] == \
        "imagenet-paper-pool"


def test_cli_ray_backend_joins_a_running_cluster(ray_local, cfg, local_zoo, tmp_path):
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({"zoo": cfg.zoo, "splits": cfg.splits, "models": [m.to_dict() for m in cfg.models],
                                    "eval_batch_size": cfg.eval_batch_size, "topk": cfg.topk}))
    out = subprocess.run([sys.executable, "-m", "tinysaver", "profile", "--config", str(conf), "--executor", "ray",
                          "--address", ray_local.get_runtime_context().gcs_address, "--shards", "3",
                          "--root", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "merged 2" in out.stdout and "retries 0" in out.stdout
    assert_same_zoo(load_zoo("rayzoo", tmp_path), local_zoo)
