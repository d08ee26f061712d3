"""Savers trained to defer: each loss moves confidence the right way, training reads only `train`,
Ctrl-C keeps the best weights, and a trained saver is one more zoo model for query and infer."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import png_bytes, run_here
from tinysaver import defer
from tinysaver.policy import confidence


def step_conf(loss_name, x, label, base_pred, alpha=1.0, label_free=False, seed=0):
    """The confidence of one sample before and after one SGD step of ``loss_name`` on it alone."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0]]))
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(confidence(model(x).detach())[0])
    loss = defer.get_defer_loss(loss_name)(model(x), torch.tensor([label]), torch.tensor([base_pred]), alpha, label_free)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before, float(confidence(model(x).detach())[0]), loss.item()


X = torch.tensor([[1.0, 0.2, 0.1, 0.0]])  # the model answers class 0


@pytest.mark.parametrize("loss", ["gatekeeper", "base-aware"])
def test_a_wrong_answer_loses_confidence_and_a_right_one_gains(loss):
    b, a, _ = step_conf(loss, X, label=0, base_pred=0)  # the saver is right
    assert a > b
    b, a, _ = step_conf(loss, X, label=1, base_pred=1)  # wrong, and the base would repair it
    assert a < b
    b0, a0, _ = step_conf(loss, X, label=1, base_pred=1, alpha=0.0)  # α = 0: no push down at all
    assert a0 == pytest.approx(b0)


def test_base_aware_leaves_a_sample_both_get_wrong_alone_and_label_free_defers_on_disagreement():
    b, a, loss = step_conf("base-aware", X, label=2, base_pred=1)  # both wrong: passing it on cannot help
    assert a == pytest.approx(b) and loss == 0.0
    b, a, _ = step_conf("gatekeeper", X, label=2, base_pred=1)  # gatekeeper pushes it down regardless
    assert a < b
    b, a, _ = step_conf("base-aware", X, label=-1, base_pred=1, label_free=True)  # no label: the base disagrees
    assert a < b
    b, a, _ = step_conf("base-aware", X, label=-1, base_pred=0, label_free=True)  # agrees with the base
    assert a > b


def test_esn_weighted_scales_cross_entropy_by_two_times_one_minus_confidence():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.1, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = defer.get_defer_loss("esn-weighted")(logits, y, y, 1.0)
    conf = confidence(logits.detach())[0]
    ce = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none")
    assert float(loss) == pytest.approx(float((2 * (1 - conf) * ce).mean()), rel=1e-6)


def test_the_cross_entropy_control_is_plain_cross_entropy_toward_labels_or_the_base():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    y, b = torch.tensor([0, 1]), torch.tensor([0, 2])
    ce = defer.get_defer_loss("cross-entropy")
    assert float(ce(logits, y, b, 5.0)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    assert float(ce(logits, y, b, 0.0, label_free=True)) == \
        pytest.approx(float(torch.nn.functional.cross_entropy(logits, b)))
    with pytest.raises(ValueError, match="unknown loss 'ce'"):
        defer.get_defer_loss("ce")


def write_split(root, n_per_class, seed, noise=False):
    rng = np.random.default_rng(seed)
    for c in range(3):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
            if not noise:  # a class is a colour channel, so tiny models can learn it
                arr[..., c] = 255
            (d / f"img{i}.png").write_bytes(png_bytes(arr))


@pytest.fixture
def defer_zoo(tmp_path):
    from tinysaver.models import ModelSpec
    from tinysaver.profiler import ProfileConfig, profile
    from tinysaver.zoo import load_zoo

    data = tmp_path / "data"
    for name, n, seed in (("train", 16, 0), ("calib", 6, 1), ("test", 6, 2)):
        write_split(data / name, n, seed)
    common = dict(num_classes=3, input_size=32)
    cfg = ProfileConfig("dz", {s: f"imagefolder:{data / s}" for s in ("train", "calib", "test")},
                        [ModelSpec("test_efficientnet", label="small", **common),
                         ModelSpec("test_resnet", label="big", **common)],
                        batch_sizes=[1], eval_batch_size=8, topk=2, latency_min_run_time=0.01)
    profile(cfg, tmp_path / "root", progress=False, log=lambda *_: None)
    return load_zoo("dz", tmp_path / "root"), data


SETTINGS = defer.DeferSettings(loss="base-aware", alphas=(0.5, 1.0), epochs=2, batch_size=8, lr=1e-3)


def test_training_never_reads_calib_or_test(defer_zoo):
    zoo, data = defer_zoo
    first = defer.train_saver(zoo, "small", "big", SETTINGS, progress=False, log=lambda *_: None)
    for split in ("calib", "test"):  # other images under the same names, and predictions of nothing
        write_split(data / split, 6, 99, noise=True)
        for m in ("small", "big"):
            f = zoo.path / "preds" / m / f"{split}.npz"
            f.write_bytes(b"poisoned")
    again = defer.train_saver(zoo, "small", "big", SETTINGS, progress=False, log=lambda *_: None)
    assert first.state_dict.keys() == again.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
    assert (first.alpha, first.epoch, first.history) == (again.alpha, again.epoch, again.history)


def test_ctrl_c_keeps_the_best_weights_so_far(defer_zoo, monkeypatch):
    zoo, _ = defer_zoo
    calls = []
    real = defer.get_defer_loss("gatekeeper")

    def interrupted(*a):
        calls.append(1)
        if len(calls) > 2:  # 38 samples to fit at batch 32: one epoch is 2 batches; Ctrl-C in the second
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(defer.DEFER_LOSSES._items, "gatekeeper", interrupted)
    s = defer.DeferSettings(loss="gatekeeper", epochs=3, batch_size=32, limit=None)
    logged = []
    r = defer.train_saver(zoo, "small", "big", s, progress=False, log=logged.append)
    assert r.interrupted and r.epoch == 1 and any("keeping the best weights" in m for m in logged)
    monkeypatch.setitem(defer.DEFER_LOSSES._items, "gatekeeper", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # nothing finished: nothing to keep
        defer.train_saver(zoo, "small", "big", s, progress=False, log=lambda *_: None)


def test_a_trained_saver_round_trips_through_the_zoo_into_query_and_infer(defer_zoo, capsys):
    from tinysaver.cascade import Cascade
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.stageplan import resolve
    from tinysaver.zoo import load_zoo

    zoo, data = defer_zoo
    root = zoo.path.parent
    out = run_here(capsys, "--root", str(root), "saver", "train", "--zoo", "dz", "--base", "big", "--saver", "small",
                   "--loss", "base-aware", "--alpha", "1", "--epochs", "1", "--batch-size", "8", "--quiet",
                   "--keep-worse")  # a round trip, whatever the one epoch gives
    assert out.returncode == 0, out.stderr
    key = defer.defer_key("small", "big")
    assert key in out.stdout
    zoo = load_zoo("dz", root)
    e = zoo.entry(key)
    assert e.status == "measured" and e.flops == zoo.entry("small").flops
    assert e.trained["from"] == "small" and e.trained["for"] == "big" and e.trained["loss"] == "base-aware"
    assert set(e.accuracy) == {"train", "calib", "test"}
    sel = select(zoo, "big", SelectorConfig(), savers=[key]).best
    assert sel.models[0] == key or sel.models == ["big"]
    result = Cascade.from_plan(resolve(sel, zoo)).predict(
        torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    assert len(result) == 5
    out = run_here(capsys, "--root", str(root), "query", "--zoo", "dz", "--base", "big", "--saver", key)
    assert out.returncode == 0 and "base: big" in out.stdout
    out = run_here(capsys, "--root", str(root), "infer", "--zoo", "dz", "--base", "big", "--saver", key,
                   "--threshold", "0", "--quiet", str(data / "test"))  # the trained saver answers all
    assert out.returncode == 0 and key in out.stdout


def test_a_zoo_copied_elsewhere_keeps_its_trained_saver_and_writes_nothing_where_its_savers_lie(defer_zoo, tmp_path):
    """A zoo whose saver checkpoint lies outside its root (a copy of the bundled zoo finds those in
    the package's checkout): the trained weights go into the zoo's own folder, not beside them."""
    import timm
    from safetensors.torch import save_file

    from tinysaver.models import ModelSpec
    from tinysaver.profiler import ProfileConfig, profile
    from tinysaver.zoo import load_zoo

    _, data = defer_zoo
    outside = tmp_path / "outside"
    outside.mkdir()
    ck = outside / "small.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(), str(ck))
    common = dict(num_classes=3, input_size=32)
    cfg = ProfileConfig("copied", {s: f"imagefolder:{data / s}" for s in ("train", "calib", "test")},
                        [ModelSpec("test_efficientnet", label="small", checkpoint=str(ck), **common),
                         ModelSpec("test_resnet", label="big", **common)], batch_sizes=[], eval_batch_size=8)
    root = tmp_path / "root2"
    profile(cfg, root, progress=False, log=lambda *_: None)
    zoo = load_zoo("copied", root)
    s = defer.DeferSettings(loss="base-aware", alphas=(1.0,), epochs=1, batch_size=8, lr=1e-3)
    r = defer.train_saver(zoo, "small", "big", s, progress=False, log=lambda *_: None)
    key = defer.add_to_zoo(zoo, "small", "big", r, s, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in outside.iterdir()) == ["small.safetensors"]
    written = load_zoo("copied", root).model_spec(key).checkpoint
    assert written is not None and Path(written).resolve().is_relative_to(root.resolve()), written


def test_bad_settings_and_zoos_without_train_are_refused_in_one_line(defer_zoo, tiny_zoo_cfg, tmp_path):
    from tinysaver.errors import TinysaverError
    from tinysaver.profiler import profile
    from tinysaver.zoo import load_zoo

    for bad in (dict(loss="nope"), dict(alphas=()), dict(holdout=0.7), dict(epochs=0), dict(limit=3)):
        with pytest.raises(TinysaverError):
            defer.DeferSettings(**bad)
    zoo, _ = defer_zoo
    with pytest.raises(TinysaverError, match="its own saver"):
        defer.train_saver(zoo, "big", "big", progress=False)
    profile(tiny_zoo_cfg, tmp_path / "r2", progress=False, log=lambda *_: None)
    with pytest.raises(TinysaverError, match="no 'train' split"):
        defer.train_saver(load_zoo("tiny", tmp_path / "r2"), "test_efficientnet", "test_resnet", progress=False)


def test_a_trained_saver_worse_than_its_start_is_not_added_unless_asked(defer_zoo, capsys, monkeypatch):
    """saver train added a fine-tuned saver whose held-out exits fell (74.0 % → 69.5 %) without a word."""
    import dataclasses

    from tinysaver.cli import saver as saver_cli
    from tinysaver.zoo import load_zoo

    zoo, _ = defer_zoo
    root = zoo.path.parent
    real = saver_cli.train_saver

    def worse(*a, **k):
        r = real(*a, **k)
        return dataclasses.replace(r, holdout_exit_before=0.740, holdout_exit_after=0.695)

    monkeypatch.setattr(saver_cli, "train_saver", worse)
    args = ("--root", str(root), "saver", "train", "--zoo", "dz", "--base", "big", "--saver", "small", "--epochs", "1",
            "--batch-size", "8", "--quiet")
    out = run_here(capsys, *args)
    assert out.returncode == 0 and "is worse than the saver it started from: held-out zero-loss exits 74.0 % " \
        "before → 69.5 % after" in out.stdout and "pass --keep-worse" in out.stdout, out.stdout
    assert defer.defer_key("small", "big") not in load_zoo("dz", root).models
    out = run_here(capsys, *args, "--keep-worse")
    assert out.returncode == 0 and "kept as --keep-worse asked" in out.stdout, out.stdout
    assert defer.defer_key("small", "big") in load_zoo("dz", root).models
