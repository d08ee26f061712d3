"""Shared fixtures: tiny real timm models with random weights and tiny synthetic images."""
import os
import tempfile

import numpy as np
import pytest
import torch

from tests.helpers import png_bytes

torch.set_num_threads(min(2, os.cpu_count() or 1))

# the user data folder (where zoos are written without --root) is a fresh one for each test session:
# tests never write into the real one, nor find zoos a user made there
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tinysaver-test-data-")
os.environ.pop("TINYSAVER_ZOO_ROOT", None)


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder with 3 classes × 4 images of mixed size and mode, plus one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in range(3):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            if i == 0:
                arr = rng.integers(0, 255, (h, w), dtype=np.uint8)  # greyscale
            elif i == 1:
                arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)  # RGBA
            else:
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            (d / f"img{i}.png").write_bytes(png_bytes(arr))
    (root / "class0" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture
def tiny_zoo_cfg(image_folder):
    from tinysaver.models import ModelSpec
    from tinysaver.profiler import ProfileConfig

    common = dict(num_classes=3, input_size=32)
    return ProfileConfig(
        zoo="tiny",
        splits={"a": f"imagefolder:{image_folder}", "b": f"imagefolder:{image_folder}"},
        models=[ModelSpec("test_efficientnet", **common), ModelSpec("test_resnet", **common),
                ModelSpec("test_vit", num_classes=3)],
        batch_sizes=[1, 2], eval_batch_size=4, topk=2, latency_min_run_time=0.01,
    )


@pytest.fixture(scope="module")
def pair():
    """A frozen saver–base pair of tiny timm models (4 classes) for the exit methods in esn/."""
    from esn.staged import staged
    from esn.train import Pair
    from tinysaver.models import ModelSpec, create_model

    torch.manual_seed(0)
    s = create_model(ModelSpec("test_efficientnet", num_classes=4, input_size=32))
    b = create_model(ModelSpec("test_resnet", num_classes=4, input_size=40))
    for m in (s, b):
        m.module.eval().requires_grad_(False)
    return Pair("tiny", "saver", "base", s, b, staged(b.module))


@pytest.fixture(scope="module")
def data():
    """48 random 36 px uint8 images with labels in 0..3."""
    from tinysaver.decoding import DecodedSet

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (48, 3, 36, 36), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (48,), generator=g).numpy()
    return DecodedSet("syn", [str(i) for i in range(48)], labels, imgs)
