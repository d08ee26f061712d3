"""The committed Fashion-MNIST checkpoints reproduce what the zoo recorded."""
import hashlib

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, need
from tinysaver.cascade import Cascade
from tinysaver.data import FASHION_MNIST_DIR, load_dataset
from tinysaver.zoo import load_zoo

CKPT = REPO / "zoo_index" / "checkpoints" / "fashion-mnist"


def test_checkpoints_match_their_manifest_and_size_budget():
    m = yaml.safe_load((CKPT / "manifest.yaml").read_text())
    assert len(m["models"]) >= 8
    total = 0
    for label, e in m["models"].items():
        blob = (CKPT / e["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == e["sha256"], label
        total += len(blob)
    assert total <= 40e6


def test_zoo_spread():
    zoo = load_zoo("fashion-mnist")
    flops = [m["flops"] for m in zoo.models.values()]
    assert max(flops) / min(flops) >= 30
    families = {m["source"]["name"].split("_")[0].rstrip("0123456789") for m in zoo.models.values()}
    assert len(families) >= 4, families
    for m in zoo.models.values():
        assert set(m["accuracy"]) == {"train", "calib", "test"}
    test_acc = sorted(m["accuracy"]["test"] for m in zoo.models.values())
    assert test_acc[0] >= 0.84 and test_acc[-1] >= 0.90, test_acc  # the issue: mid-80s to low-90s


@pytest.mark.parametrize("which", [0, -1])  # the cheapest and the most expensive model
def test_reloaded_checkpoint_reproduces_recorded_predictions(which):
    need(FASHION_MNIST_DIR.is_dir(), "Debian dataset-fashion-mnist")
    zoo = load_zoo("fashion-mnist")
    key = sorted(zoo.models, key=lambda k: zoo.models[k]["flops"])[which]
    model = zoo.load_model(key)
    data = load_dataset("fashion-mnist:test", progress=False)
    res = Cascade([model], []).predict(data.images, batch_size=500)
    stored = zoo.predictions(key, "test")
    # same weights, same batch size and kernels: the classes must match exactly; confidences to float noise
    assert np.array_equal(res.pred, stored.pred)
    np.testing.assert_allclose(res.conf, stored.conf, atol=1e-5)
    trained = yaml.safe_load((CKPT / "manifest.yaml").read_text())["models"][key]
    assert float((res.pred == data.labels).mean()) == pytest.approx(trained["test_acc"], abs=0)
