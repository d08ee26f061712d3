
import numpy as np
import pytest

from tests.helpers import need, write_idx
from tinysaver.sources import FASHION_MNIST_DIR, fashion_mnist_arrays
from tinysaver.errors import DatasetError
from tinysaver.data import load_dataset


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_with_path_override(tmp_path, gz):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (30, 28, 28))
    y = rng.integers(0, 10, 30)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", x, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", y, gz)
    ds = load_dataset(f"fashion-mnist:test:{tmp_path}")
    assert len(ds) == 30 and ds.images.shape == (30, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), x) and np.array_equal(ds.labels, y)
    assert ds.ids[0] == "t10k/00000" and ds.class_names[9] == "Ankle boot"


def test_truncated_and_missing_idx(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), False)
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(f"fashion-mnist:test:{tmp_path}")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:test:{tmp_path / 'nowhere'}")


def test_real_fashion_mnist_splits():
    need(FASHION_MNIST_DIR.is_dir(), "Debian dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
    _, ytr, itr = fashion_mnist_arrays("train")
    _, yca, ica = fashion_mnist_arrays("calib")
    _, yte, ite = fashion_mnist_arrays("test")
    assert (len(itr), len(ica), len(ite)) == (50_000, 10_000, 10_000)
    assert not set(itr) & set(ica)  # calib is held out of training
    assert np.bincount(yca, minlength=10).min() > 800  # a random, roughly balanced hold-out
