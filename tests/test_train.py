"""The zoo trainer on a synthetic Fashion-MNIST-shaped folder: seeded, resumable, reloadable."""
import hashlib

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import write_idx
from tinysaver.sources import fashion_mnist_set
from tinysaver.models import create_model
from tinysaver.train import TrainConfig, _augment, spec_for, train_zoo


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """10,050 official-train images (the calib split takes 10,000 of them) and 40 test images."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 10_050), ("t10k", 40)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28)) + (y * 19)[:, None, None]  # brightness tells the class
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, False)
    return root


def config(out, data_root):
    return TrainConfig(
        models=[{"arch": "test_resnet", "train_samples": 64, "lr": 0.01},
                {"arch": "test_vit", "label": "vit_small_in", "input_size": 48, "train_samples": 32}],
        out_dir=str(out), data_root=str(data_root), batch_size=16, warmup_steps=1, eval_batch_size=2000)


def test_train_zoo_is_seeded_resumable_and_reloads_exactly(tmp_path, fake_fashion):
    manifest_path = train_zoo(config(tmp_path / "a", fake_fashion))
    man = yaml.safe_load(manifest_path.read_text())["models"]
    assert set(man) == {"test_resnet", "vit_small_in"}
    assert man["vit_small_in"]["spec"]["input_size"] == 48 and man["test_resnet"]["spec"]["input_size"] == 32
    for label, rec in man.items():
        blob = (tmp_path / "a" / rec["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == rec["sha256"] and len(blob) == rec["bytes"]
        assert rec["dtype"] in ("float16", "float32") and 0 <= rec["test_acc"] <= 1
    # reloading the saved weights gives exactly the recorded test accuracy
    test = fashion_mnist_set("test", fake_fashion)
    rec = man["test_resnet"]
    model = create_model(spec_for({"arch": "test_resnet"}, config(tmp_path, fake_fashion),
                                  checkpoint=str(tmp_path / "a" / rec["file"])))
    with torch.inference_mode():
        from tinysaver.transforms import prepare_batch

        pred = model.module.eval()(prepare_batch(test.images, model.preprocess)).argmax(-1).numpy()
    assert float((pred == test.labels).mean()) == rec["test_acc"]
    # a second run trains nothing; a fresh run with the same seed writes identical weights
    before = manifest_path.stat().st_mtime_ns
    train_zoo(config(tmp_path / "a", fake_fashion))
    assert manifest_path.stat().st_mtime_ns == before
    again = yaml.safe_load(train_zoo(config(tmp_path / "b", fake_fashion)).read_text())["models"]
    assert {k: v["sha256"] for k, v in again.items()} == {k: v["sha256"] for k, v in man.items()}


def test_augment_flips_and_shifts_only():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 25, dtype=torch.uint8).reshape(4, 1, 5, 5)
    flipped = _augment(x, g)
    for a, b in zip(flipped, x):  # each image is itself or its mirror
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    assert not all(torch.equal(a, b) for a, b in zip(flipped, x))  # with this seed, some flip
    shifted = _augment(x, torch.Generator().manual_seed(1), shift=1)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    assert torch.equal(_augment(x, torch.Generator().manual_seed(1), shift=1), shifted)  # seeded


@pytest.mark.parametrize("entry, match", [
    ({"arch": "test_resnet", "train_sample": 10}, "unknown key"),
    ({"arch": "test_resnet", "input_size": 24}, "≥ 28"),
    ({"arch": "test_resnet", "lr": 0}, "positive"),
    ({"label": "x"}, "needs an 'arch'"),
])
def test_config_rejects_bad_model_entries(entry, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(models=[entry])


def test_config_rejects_duplicate_labels_and_empty_lists():
    with pytest.raises(ValueError, match="unique"):
        TrainConfig(models=[{"arch": "test_resnet"}, {"arch": "test_resnet"}])
    with pytest.raises(ValueError, match="no models"):
        TrainConfig(models=[])
