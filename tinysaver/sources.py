"""Where labelled images come from: one registered kind per dataset name, ``KIND:ARGS``.

- ``imagefolder:PATH``          class sub-folders, labels by sorted folder name;
- ``imagenet:PATH``             a folder or ``.tar`` of ``<wnid>_<anything>.JPEG`` files;
- ``foolbox``                   the 20 ImageNet images inside the foolbox package;
- ``fashion-mnist:SPLIT[:DIR]`` SPLIT is ``train`` (the 50k kept for training), ``calib``
                                 (10k held out of the official train set), ``trainfull`` or ``test``.

A kind either lists files (``listing``: a `RawSource`, decoded later)
or holds decoded arrays already (``arrays``, with ``count`` to size it without loading). A new kind
is one `register_source` call; `tinysaver.data` reads them all through `SOURCES`.
`paths_source` reads the unlabelled files that ``tinysaver infer`` is given.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import stat
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .decoding import DecodedSet, RawSource, unreadable_reason
from .errors import DatasetError
from .limits import MAX_FILE_BYTES
from .registry import Registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CALIB_SIZE = 10_000
CALIB_SEED = 0


@dataclass(frozen=True)
class SourceKind:
    """One kind of dataset name. ``usage``: how it is written, for messages."""

    usage: str
    listing: Callable[[str], RawSource] | None = None  # ARGS → the files, undecoded
    arrays: Callable[[str, int | None, tuple[int, int] | None], DecodedSet] | None = None  # ARGS, limit, rows
    count: Callable[[str], int] | None = None  # ARGS → samples in an ``arrays`` kind, without loading them
    zoo: tuple[str, str] | None = None  # the bundled zoo whose models know these classes, and its best model
    sample: str | None = None  # the dataset name `tinysaver data sample` draws that zoo's images from


SOURCES: Registry[SourceKind] = Registry("dataset kind", DatasetError)


def register_source(kind: str, usage: str, *, listing=None, arrays=None, count=None, zoo=None, sample=None) -> None:
    """Register the dataset kind ``kind`` (exactly one of ``listing`` and ``arrays``); ``zoo``: the
    bundled (zoo, base) whose models know its classes, and ``sample``, the name that gives its images."""
    if (listing is None) == (arrays is None) or (arrays is not None and count is None):
        raise DatasetError(f"source {kind!r}: give a listing, or arrays with their count")
    SOURCES.add(kind, SourceKind(usage, listing, arrays, count, zoo, sample))


def _imagenet_index() -> dict[str, int]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {wnid: i for i, wnid in enumerate(info.label_names())}


def imagenet_class_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _wnid_label(filename: str, index: dict[str, int]) -> int:
    wnid = Path(filename).name.split("_")[0]
    if wnid not in index:
        raise DatasetError(f"{filename}: name does not start with an ImageNet wnid (like n01440764_...)")
    return index[wnid]


def imagenet_source(path: str | os.PathLike) -> RawSource:
    """ImageNet-style folder or tar: the label is the wnid prefix of each file name."""
    p = Path(path)
    index = _imagenet_index()
    if p.is_file() and (p.suffix.lower() == ".tar" or tarfile.is_tarfile(p)):
        tf = _open_tar(p)
        members = sorted((m for m in _tar_members(p, tf) if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES),
                         key=lambda m: m.name)
        ids = [m.name for m in members]

        def read(i: int) -> bytes:
            f = tf.extractfile(members[i])
            assert f is not None
            return f.read()
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        ids = [str(f.relative_to(p)) for f in files]

        def read(i: int) -> bytes:
            return files[i].read_bytes()
    else:
        raise DatasetError(f"imagenet:{path}: not a folder or a tar file")
    if not ids:
        raise DatasetError(f"imagenet:{path}: no image files found")
    labels = np.array([_wnid_label(i, index) for i in ids], dtype=np.int64)
    return RawSource(f"imagenet:{p.name}", ids, labels, read, imagenet_class_names())


def imagefolder_source(path: str | os.PathLike) -> RawSource:
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"imagefolder:{path}: not a folder")
    classes = sorted(d.name for d in p.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"imagefolder:{path}: no class sub-folders")
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((p / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(c)
    if not files:
        raise DatasetError(f"imagefolder:{path}: no image files found")
    ids = [str(f.relative_to(p)) for f in files]
    return RawSource(f"imagefolder:{p.name}", ids, np.array(labels, dtype=np.int64),
                     lambda i: files[i].read_bytes(), classes)


def foolbox_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the foolbox images need the PyPI package foolbox: pip install foolbox")
    return Path(spec.submodule_search_locations[0]) / "data"


def foolbox_source() -> RawSource:
    """The 20 ImageNet images shipped in foolbox, named ``imagenet_<nn>_<label>.jpg``."""
    d = foolbox_dir()
    files = sorted(d.glob("imagenet_*.jpg"))
    if len(files) != 20:
        raise DatasetError(f"expected 20 foolbox ImageNet images in {d}, found {len(files)}")
    labels = np.array([int(f.stem.split("_")[-1]) for f in files], dtype=np.int64)
    return RawSource("foolbox", [f.name for f in files], labels, lambda i: files[i].read_bytes(), imagenet_class_names())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise DatasetError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        "'apt-get install -y dataset-fashion-mnist' or pass fashion-mnist:SPLIT:DIR"
    )


def fashion_mnist_arrays(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 28, 28) uint8, labels (N,) and ids for one split.

    ``train`` and ``calib`` split the official 60k training images with a fixed seed into
    50k and 10k; ``trainfull`` is all 60k; ``test`` is the official 10k.
    """
    if split not in ("train", "calib", "trainfull", "test"):
        raise DatasetError(f"fashion-mnist split must be train, calib, trainfull or test, got {split!r}")
    base = Path(root) if root else FASHION_MNIST_DIR
    if not base.is_dir() and root is None:
        base = _download_fashion_mnist()
    prefix = "t10k" if split == "test" else "train"
    x = _read_idx(_find_idx(base, f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(_find_idx(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(x) != len(y):
        raise DatasetError(f"{base}: {len(x)} images but {len(y)} labels")
    idx = np.arange(len(x))
    if split in ("train", "calib"):
        perm = np.random.default_rng(CALIB_SEED).permutation(len(x))
        idx = np.sort(perm[:CALIB_SIZE] if split == "calib" else perm[CALIB_SIZE:])
    ids = [f"{prefix}/{i:05d}" for i in idx]
    return x[idx], y[idx], ids


def _download_fashion_mnist() -> Path:
    """Fallback for machines with internet and no Debian package: torchvision's downloader."""
    from torchvision.datasets import FashionMNIST

    root = Path(os.environ.get("TINYSAVER_DATA", Path.home() / ".cache" / "tinysaver"))
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise DatasetError(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR} and could not be downloaded ({e}). "
            "Install it with 'apt-get install -y dataset-fashion-mnist'"
        ) from e
    return root / "FashionMNIST" / "raw"


def fashion_mnist_set(split: str, root: str | os.PathLike | None = None, limit: int | None = None,
                      rows: tuple[int, int] | None = None) -> DecodedSet:
    """One split decoded already: images (N, 1, 28, 28) uint8, the first ``limit``, then ``rows``."""
    x, y, ids = fashion_mnist_arrays(split, root)
    if limit is not None:
        x, y, ids = x[:limit], y[:limit], ids[:limit]
    if rows is not None:
        x, y, ids = x[rows[0]:rows[1]], y[rows[0]:rows[1]], ids[rows[0]:rows[1]]
    images = torch.from_numpy(np.ascontiguousarray(x))[:, None]  # (N, 1, 28, 28)
    return DecodedSet(f"fashion-mnist:{split}", ids, y, images, list(FASHION_MNIST_CLASSES))


def _open_tar(p: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(p)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{p}: not a readable .tar archive ({unreadable_reason(e)}); is it truncated?") from None


def _tar_members(p: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    try:
        return tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{p}: the .tar archive is truncated or corrupt ({unreadable_reason(e)})") from None


def paths_source(paths: Sequence[str | os.PathLike]) -> RawSource:
    """Unlabelled images from files, folders (searched recursively) and tar files, for inference.

    Only regular files are read: a FIFO, socket or device with an image name would block or lie, and
    a folder named ``x.jpg`` is a folder. What is found but skipped (those, and folders that cannot be
    listed) is counted in ``skipped``, one sentence each, never dropped silently.
    """
    ids: list[str] = []
    readers: list[Callable[[], bytes]] = []
    skipped: list[str] = []
    followed: list[str] = []

    def add_file(f: Path) -> None:
        try:
            st = f.stat()
        except OSError as e:
            skipped.append(f"{shown_path(f)}: {unreadable_reason(e)}")
            return
        if stat.S_ISDIR(st.st_mode):
            skipped.append(f"{shown_path(f)}: a folder with an image file's name")
        elif not stat.S_ISREG(st.st_mode):
            skipped.append(f"{shown_path(f)}: not a regular file (a pipe, socket or device)")
        elif st.st_size > MAX_FILE_BYTES:  # a 5 GB (sparse) file is refused from its size, never read
            skipped.append(f"{shown_path(f)}: {st.st_size:,} bytes is over the limit of {MAX_FILE_BYTES:,} bytes "
                           "for one image file")
        else:
            ids.append(shown_path(f))
            readers.append(f.read_bytes)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = []

            def unlisted(e: OSError) -> None:
                skipped.append(f"{shown_path(Path(e.filename))}: folder not listed ({unreadable_reason(e)})")

            # links to folders are followed once each (a link back up would loop) and said, never
            # dropped without a word
            seen = [os.path.realpath(p)]
            for top, dirs, files in os.walk(p, onerror=unlisted, followlinks=True):
                dirs.sort()
                for d in [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                    real, link = os.path.realpath(os.path.join(top, d)), shown_path(Path(top) / d)
                    inside = lambda a, b: a == b or a.startswith(b + os.sep)  # noqa: E731
                    if any(inside(real, s) or inside(s, real) for s in seen):  # read already, or a loop
                        dirs.remove(d)
                        skipped.append(f"{link}: a link to {shown_path(Path(real))}, which is read already "
                                       "(or holds a folder that is)")
                    else:
                        seen.append(real)
                        followed.append(f"{link} → {shown_path(Path(real))}")
                for name in files + [d for d in dirs if Path(d).suffix.lower() in IMAGE_SUFFIXES]:
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append(Path(top) / name)
            for f in sorted(found):
                add_file(f)
        elif p.is_file() and p.suffix.lower() == ".tar":
            tf = _open_tar(p)
            for m in sorted(_tar_members(p, tf), key=lambda m: m.name):
                if Path(m.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if m.isfile():
                    ids.append(f"{p}:{m.name}")
                    readers.append(lambda m=m, tf=tf: tf.extractfile(m).read())
                else:
                    skipped.append(f"{p}:{m.name}: not a regular file in the archive")
        elif p.exists() or p.is_symlink():
            add_file(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    return RawSource("paths", ids, np.full(len(ids), -1, dtype=np.int64), lambda i: readers[i](), skipped=skipped,
                     followed=followed)


def shown_path(p: Path) -> str:
    """A path as text that prints anywhere: bytes that are not UTF-8 (kept by Python as surrogates)
    become backslash escapes, so one odd file name never stops a run on a UnicodeEncodeError."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _fashion_args(args: str) -> tuple[str, str | None]:
    """``SPLIT[:DIR]`` → (split, folder or None); the split defaults to ``test``."""
    split, _, root = args.partition(":")
    return split or "test", root or None


register_source("imagefolder", "imagefolder:PATH", listing=imagefolder_source)
_LITE = ("imagenet-lite", "tf_efficientnet_lite2.pypi_in1k")
register_source("imagenet", "imagenet:PATH", listing=imagenet_source, zoo=_LITE)
register_source("foolbox", "foolbox", listing=lambda args: foolbox_source(), zoo=_LITE, sample="foolbox")
register_source("fashion-mnist", "fashion-mnist:SPLIT[:DIR]",
                arrays=lambda args, limit, rows: fashion_mnist_set(*_fashion_args(args), limit, rows),
                count=lambda args: len(fashion_mnist_arrays(*_fashion_args(args))[2]),
                zoo=("fashion-mnist", "resnet10t"), sample="fashion-mnist:test")


__all__ = ["IMAGE_SUFFIXES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "CALIB_SIZE", "CALIB_SEED",
           "SourceKind", "SOURCES", "register_source", "imagenet_class_names", "imagenet_source",
           "imagefolder_source", "foolbox_dir", "foolbox_source", "fashion_mnist_arrays", "fashion_mnist_set",
           "paths_source", "shown_path"]
