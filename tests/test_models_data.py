import io

import numpy as np
import pytest
import torch

from tinysaver.errors import DatasetError
from tinysaver.decoding import decode_image, fingerprint
from tinysaver.data import load_dataset
from tinysaver.models import (
    CheckpointError,
    ModelNotFoundError,
    ModelSpec,
    Preprocess,
    create_model,
    pair_state_dict_in_order,
)
from tinysaver.transforms import prepare_batch


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelNotFoundError, match="resnet50"):
        create_model("resnet5O")
    with pytest.raises(ModelNotFoundError, match="torchvision/resnet18"):
        create_model("torchvision/resnet19")


def test_timm_tag_and_torchvision_names_resolve():
    from tinysaver.models import resolve_kind

    assert resolve_kind("resnet50.tv_in1k") == "timm"
    assert resolve_kind("convnextv2_atto.fcmae_ft_in1k") == "timm"
    assert resolve_kind("torchvision/mobilenet_v3_small") == "torchvision"
    m = create_model("torchvision/mobilenet_v3_small")
    assert m.num_classes == 1000 and m.preprocess.interpolation == "bilinear"


def test_each_model_keeps_its_own_preprocessing():
    a = create_model(ModelSpec("test_vit", num_classes=3))
    b = create_model(ModelSpec("test_efficientnet", num_classes=3, input_size=40))
    assert a.preprocess != b.preprocess
    assert b.preprocess.input_size == (3, 40, 40)


def test_override_classes_and_channels():
    m = create_model(ModelSpec("test_resnet", num_classes=7, in_chans=1, input_size=32))
    assert m.num_classes == 7 and m.preprocess.input_size == (1, 32, 32)
    assert len(m.preprocess.mean) == 1
    x = prepare_batch(torch.zeros(2, 3, 50, 60, dtype=torch.uint8), m.preprocess)
    assert x.shape == (2, 1, 32, 32)


def test_checkpoint_errors_name_file_and_key(tmp_path):
    from safetensors.torch import save_file

    m = create_model(ModelSpec("test_resnet", num_classes=3))
    sd = dict(m.module.state_dict())
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(good))
    m2 = create_model(ModelSpec("test_resnet", num_classes=3, checkpoint=str(good)))
    for k, v in m2.module.state_dict().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(CheckpointError, match="missing.pt"):
        create_model(ModelSpec("test_resnet", num_classes=3, checkpoint=str(tmp_path / "missing.pt")))
    bad = dict(sd)
    first = next(k for k in sd if k.endswith("weight"))
    bad[first] = torch.zeros(1)
    badf = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(badf))
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*{first}"):
        create_model(ModelSpec("test_resnet", num_classes=3, checkpoint=str(badf)))


def test_pair_in_order_checks_every_shape():
    m = create_model(ModelSpec("test_resnet", num_classes=3)).module
    src = {f"x{i}": v.clone() for i, (k, v) in enumerate(m.state_dict().items()) if "num_batches" not in k}
    out = pair_state_dict_in_order(src, m, "f.pth")
    assert list(out) == [k for k in m.state_dict() if not k.endswith("num_batches_tracked")]
    key = list(src)[3]
    src[key] = torch.zeros(99)
    with pytest.raises(CheckpointError, match=f"f.pth: first mismatched key '{key}'"):
        pair_state_dict_in_order(src, m, "f.pth")


def test_image_folder_skips_corrupt_and_converts_modes(image_folder):
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_dataset(f"imagefolder:{image_folder}", progress=False)
    assert len(ds) == 12 and len(ds.failures) == 1 and "broken.png" in ds.failures[0][0]
    assert {im.shape[0] for im in ds.images} == {1, 3}  # RGBA became RGB; grey stays 1 channel until a model asks
    pre = Preprocess((3, 24, 24), 0.875, "bicubic")
    assert prepare_batch(ds.images, pre).shape == (12, 3, 24, 24)


def test_fingerprint_depends_on_ids_and_labels():
    a = fingerprint(["x", "y"], np.array([0, 1]))
    assert a == fingerprint(["x", "y"], np.array([0, 1]))
    assert a != fingerprint(["x", "y"], np.array([1, 1]))
    assert a != fingerprint(["y", "x"], np.array([0, 1]))


def test_bad_dataset_uris(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("nope:thing")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")
    with pytest.raises(DatasetError, match="split"):
        load_dataset("fashion-mnist:valid")
    from tinysaver.errors import ImageError, TinysaverError

    with pytest.raises(ImageError, match="^not an image") as e:  # a plain sentence, no decoder repr
        decode_image(b"garbage")
    assert isinstance(e.value, TinysaverError) and "BytesIO" not in str(e.value)


def test_imagenet_tar_labels_from_wnid(tmp_path):
    import tarfile

    from tests.helpers import png_bytes

    f = tmp_path / "x.tar"
    with tarfile.open(f, "w") as tf:
        for name in ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG"]:
            data = png_bytes(np.zeros((8, 8, 3), np.uint8))
            info = tarfile.TarInfo(f"d/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = load_dataset(f"imagenet:{f}", progress=False)
    assert ds.labels.tolist() == [0, 1]


def test_16_bit_png_is_scaled_not_clipped():
    from PIL import Image

    rng = np.random.default_rng(3)
    grey8 = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey8.astype(np.uint16) * 257).save(buf, format="PNG")  # 16-bit greyscale
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    got = decode_image(buf.getvalue())
    assert got.shape == (1, 12, 10)
    assert np.array_equal(got[0].numpy(), grey8)  # not an all-white image


def test_exif_orientation_is_applied():
    from PIL import Image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    got = decode_image(buf.getvalue())
    assert got.shape == (3, 40, 20)  # displayed upright: taller than wide
    assert got[:, :20].float().mean() > 200 and got[:, 20:].float().mean() < 50  # white half now on top
