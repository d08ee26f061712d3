"""Labelled image sets, decoded once and shared by every model in a run.

A dataset is named by a URI-like string:

- ``imagefolder:PATH``          class sub-folders, labels by sorted folder name;
- ``imagenet:PATH``             a folder or ``.tar`` of ``<wnid>_<anything>.JPEG`` files;
- ``foolbox``                   the 20 ImageNet images inside the foolbox package;
- ``fashion-mnist:SPLIT[:DIR]`` SPLIT is ``train`` (the 50k kept for training), ``calib``
                                 (10k held out of the official train set), ``trainfull`` or ``test``.

Every sample has a stable string id, and :func:`fingerprint` hashes ids plus labels so that
predictions of different models are only compared on identical samples.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DatasetError, ImageError, PixelCapError  # noqa: F401 (re-exported)
from .limits import MAX_PIXELS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CALIB_SIZE = 10_000
CALIB_SEED = 0



@dataclass
class RawSource:
    """Samples before decoding: ids, labels (-1 when unknown) and a reader of raw bytes."""

    name: str
    ids: list[str]
    labels: np.ndarray
    read: Callable[[int], bytes]
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # what was found but not listed, one sentence each


@dataclass
class DecodedSet:
    """Decoded uint8 images, (C, H, W) each, that decoded cleanly, in a stable order.

    ``images`` is either a list of tensors (mixed sizes) or one (N, C, H, W) tensor.
    ``failures`` lists ``(id, reason)`` for every sample skipped as unreadable.
    """

    name: str
    ids: list[str]
    labels: np.ndarray
    images: list[torch.Tensor] | torch.Tensor
    class_names: list[str] | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ids, self.labels)

    def batch(self, start: int, stop: int) -> list[torch.Tensor] | torch.Tensor:
        return self.images[start:stop]

    def subset(self, index: Sequence[int]) -> "DecodedSet":
        index = list(index)
        return DecodedSet(self.name, [self.ids[i] for i in index], self.labels[index], take_images(self.images, index),
                          self.class_names)


def take_images(images: list[torch.Tensor] | torch.Tensor, index) -> list[torch.Tensor] | torch.Tensor:
    """The images at ``index`` (ints, an array or a tensor), in that order, in the container they came in:
    rows of an (N, C, H, W) tensor, or items of a list of (C, H, W) tensors of any sizes."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(index, dtype=torch.long)]
    return [images[int(i)] for i in index]


def fingerprint(ids: Sequence[str], labels: np.ndarray) -> str:
    """sha256 over the ordered ids and labels (first 16 hex digits)."""
    h = hashlib.sha256()
    for i, y in zip(ids, np.asarray(labels).tolist()):
        h.update(f"{i}\t{y}\n".encode())
    return h.hexdigest()[:16]




@dataclass(frozen=True)
class InputBudget:
    """How many pixels one image may cost, checked from its header before any pixel is decoded.

    ``max_pixels`` caps width × height as decoded and, with the same number, the image that each of
    ``preprocess`` (the run's models) makes of it when resizing to its input, before the crop: a long
    thin image is small on disk and as decoded, but 100000 × 1 pixels becomes 256 × 25,600,000 for a
    224-pixel model. None: no cap (PIL's own bomb limit is off either way; this budget replaces it).
    """

    max_pixels: int | None = MAX_PIXELS
    preprocess: tuple = ()  # tinysaver.models.Preprocess of each model the images are for

    def __post_init__(self) -> None:
        m = self.max_pixels
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
            raise DatasetError(f"the pixel cap must be a whole number of pixels ≥ 1, got {m!r}")

    @classmethod
    def of(cls, budget: "InputBudget | int | None") -> "InputBudget":
        """A budget as given, or the one of a bare pixel cap (an int, or None for none)."""
        return budget if isinstance(budget, InputBudget) else cls(budget)

    def check(self, width: int, height: int) -> None:
        """PixelCapError (one sentence) when an image of ``width`` × ``height`` is over the budget."""
        cap = self.max_pixels
        if cap is None:
            return
        if width * height > cap:
            raise PixelCapError(f"{width} × {height} pixels is over the cap of {cap:,} pixels (--max-pixels)")
        for pre in self.preprocess:
            size = pre.resized_size(height, width)
            if size is not None and size[0] * size[1] > cap:
                raise PixelCapError(
                    f"{width} × {height} pixels would be resized to {size[1]:,} × {size[0]:,} for a model's "
                    f"{pre.input_size[2]} × {pre.input_size[1]} input, over the cap of {cap:,} pixels (--max-pixels)")


def decode_image(data: bytes, max_pixels: InputBudget | int | None = MAX_PIXELS) -> torch.Tensor:
    """Decode image bytes to a uint8 (C, H, W) tensor with C=1 (greyscale) or C=3 (RGB).

    The EXIF orientation is applied. RGBA, palette and CMYK images become RGB; 16-bit greyscale
    is scaled (not clipped) to 8 bits, and float greyscale in [0, 1] is scaled to [0, 255].
    The size is read from the header first and checked against ``max_pixels``, an
    :class:`InputBudget` or a bare pixel cap (width × height; None: no cap): an image over it raises
    ``PixelCapError`` before any pixel is decoded. Anything that is not a usable image raises
    ``ImageError`` with one plain sentence, whatever the decoder raised.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    budget = InputBudget.of(max_pixels)
    # PIL's fixed bomb limit (a warning naming the file at 89 MP, a refusal at 179 MP) would overrule
    # --max-pixels both ways; the budget reads the same header, so it is the one rule
    Image.MAX_IMAGE_PIXELS = None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            budget.check(w, h)
            if w * h == 0:
                raise ImageError(f"the image has no pixels ({w} × {h})")
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(im, dtype=np.float64)  # 16-bit samples: scale, do not clip, to 8 bits
                sixteen = im.mode.startswith("I;16") or wide.max(initial=0) > 255
                arr = np.clip(np.round(wide / (257.0 if sixteen else 1.0)), 0, 255).astype(np.uint8)
            elif im.mode == "F":
                wide = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
                arr = np.clip(np.round(wide * (255.0 if wide.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
            else:
                if im.mode not in ("L", "RGB"):
                    im = im.convert("L" if im.mode == "1" else "RGB")
                arr = np.array(im, dtype=np.uint8)  # a writable copy: torch warns on read-only buffers
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image, or in a format tinysaver cannot read (JPEG, PNG, BMP, WebP, GIF, TIFF)") \
            from None
    except MemoryError:
        raise ImageError("too large to decode in the memory available") from None
    except Exception as e:  # PIL reports bad data as OSError, SyntaxError, ValueError, struct.error, ...
        first = (str(e).splitlines() or [""])[0][:120]
        raise ImageError("truncated or corrupt image data" + (f" ({first})" if first else "")) from None
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        raise ImageError(f"an image of unexpected shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def unreadable_reason(e: BaseException) -> str:
    """One plain sentence for why a file could not be used (no class names, no object reprs)."""
    if isinstance(e, ImageError):
        return str(e)
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(e, (OSError, tarfile.TarError, EOFError)):
        return f"cannot be read ({getattr(e, 'strerror', None) or (str(e).splitlines() or ['I/O error'])[0][:120]})"
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def decoded_blocks(source: RawSource, block: int, max_pixels: InputBudget | int | None = MAX_PIXELS):
    """Decode ``source`` ``block`` samples at a time, skipping unreadable ones.

    Yields ``(index, images, failures)`` per block: the source positions and uint8 images that
    decoded, and ``(id, reason)`` for each sample that did not (``reason`` is one plain sentence).
    """
    for start in range(0, len(source.ids), block):
        index, images, failures = [], [], []
        for i in range(start, min(start + block, len(source.ids))):
            try:
                images.append(decode_image(source.read(i), max_pixels))
            except Exception as e:  # one unusable file is reported and skipped, never fatal
                failures.append((source.ids[i], unreadable_reason(e)))
                continue
            index.append(i)
        yield index, images, failures


def decode_all(source: RawSource, progress: bool = True,
               max_pixels: InputBudget | int | None = MAX_PIXELS) -> DecodedSet:
    """Decode every sample once; unreadable ones are skipped, counted and reported."""
    from tqdm.auto import tqdm

    index, images, failures = [], [], []
    bar = tqdm(total=len(source.ids), desc=f"decode {source.name}", disable=not progress, leave=False)
    for b_index, b_images, b_failures in decoded_blocks(source, 256, max_pixels):
        index += b_index
        images += b_images
        failures += b_failures
        bar.update(len(b_index) + len(b_failures))
    bar.close()
    ids = [source.ids[i] for i in index]
    labels = [int(source.labels[i]) for i in index]
    if failures:
        warnings.warn(f"{source.name}: skipped {len(failures)} unreadable image(s), first: "
                      f"{failures[0][0]}: {failures[0][1]}")
    return DecodedSet(source.name, ids, np.asarray(labels, dtype=np.int64), images, source.class_names, failures)


# --- sources ---------------------------------------------------------------------------------------

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
    import importlib.util

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
    x, y, ids = fashion_mnist_arrays(split, root)
    if limit is not None:
        x, y, ids = x[:limit], y[:limit], ids[:limit]
    if rows is not None:
        x, y, ids = x[rows[0]:rows[1]], y[rows[0]:rows[1]], ids[rows[0]:rows[1]]
    images = torch.from_numpy(np.ascontiguousarray(x))[:, None]  # (N, 1, 28, 28)
    return DecodedSet(f"fashion-mnist:{split}", ids, y, images, list(FASHION_MNIST_CLASSES))


def load_dataset(uri: str, progress: bool = True, limit: int | None = None,
                 rows: tuple[int, int] | None = None,
                 max_pixels: InputBudget | int | None = MAX_PIXELS) -> DecodedSet:
    """Load and decode a dataset named as described in the module docstring.

    ``limit`` keeps the first N samples; ``rows=(start, stop)`` then keeps that range of them (a
    shard), counted before unreadable images are skipped, so shards concatenate to the whole set.
    Images over ``max_pixels`` (an :class:`InputBudget` or a pixel cap) are skipped and counted like
    unreadable ones.
    """
    kind, _, rest = uri.partition(":")
    if kind == "fashion-mnist":
        split, _, root = rest.partition(":")
        return fashion_mnist_set(split or "test", root or None, limit, rows)
    src = raw_source(uri, limit)
    if rows is not None:
        sl = slice(*rows)
        src = RawSource(src.name, src.ids[sl], src.labels[sl], lambda i, a=rows[0], read=src.read: read(a + i),
                        src.class_names)
    return decode_all(src, progress=progress, max_pixels=max_pixels)


def dataset_size(uri: str, limit: int | None = None) -> int:
    """How many samples ``load_dataset(uri, limit=limit)`` reads (before skipping unreadable ones),
    found by listing, not decoding."""
    kind, _, rest = uri.partition(":")
    if kind == "fashion-mnist":
        split, _, root = rest.partition(":")
        n = len(fashion_mnist_arrays(split or "test", root or None)[2])
        return n if limit is None else min(n, limit)
    return len(raw_source(uri, limit).ids)


def raw_source(uri: str, limit: int | None = None) -> RawSource:
    """The undecoded samples of a file-based dataset URI (not fashion-mnist, which is arrays)."""
    kind, _, rest = uri.partition(":")
    if kind == "foolbox":
        src = foolbox_source()
    elif kind == "imagenet":
        src = imagenet_source(rest)
    elif kind == "imagefolder":
        src = imagefolder_source(rest)
    else:
        raise DatasetError(
            f"unknown dataset {uri!r}; use imagefolder:PATH, imagenet:PATH, foolbox or fashion-mnist:SPLIT[:DIR]"
        )
    if limit is not None:
        src = RawSource(src.name, src.ids[:limit], src.labels[:limit], src.read, src.class_names)
    return src


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

    def add_file(f: Path) -> None:
        try:
            mode = f.stat().st_mode
        except OSError as e:
            skipped.append(f"{f}: {unreadable_reason(e)}")
            return
        if stat.S_ISDIR(mode):
            skipped.append(f"{f}: a folder with an image file's name")
        elif not stat.S_ISREG(mode):
            skipped.append(f"{f}: not a regular file (a pipe, socket or device)")
        else:
            ids.append(str(f))
            readers.append(f.read_bytes)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = []

            def unlisted(e: OSError) -> None:
                skipped.append(f"{e.filename}: folder not listed ({unreadable_reason(e)})")

            for top, dirs, files in os.walk(p, onerror=unlisted):
                dirs.sort()
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
    return RawSource("paths", ids, np.full(len(ids), -1, dtype=np.int64), lambda i: readers[i](), skipped=skipped)


def sample_images(uri: str, out: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` images of dataset ``uri``, chosen with ``seed``, as ``out/<index>_<label>.png``.

    Refuses (before writing anything) when any target file exists; each file is written to a
    temporary name and renamed, so an interrupted run leaves only whole images.
    """
    from PIL import Image

    kind, _, rest = uri.partition(":")
    if kind == "fashion-mnist":
        split, _, root = rest.partition(":")
        ds = fashion_mnist_set(split or "test", root or None)
        names = FASHION_MNIST_CLASSES
    else:
        ds = load_dataset(uri, progress=False)
        names = ds.class_names
    if n > len(ds):
        raise DatasetError(f"{uri} has {len(ds)} images; ask for at most that many with -n")
    pick = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    out = Path(out)
    targets = []
    for i in pick.tolist():
        y = int(ds.labels[i])
        label = (names[y] if names and 0 <= y < len(names) else str(y)).replace("/", "-").replace(" ", "_")
        targets.append(out / f"{i:05d}_{label}.png")
    clash = [t for t in targets if t.exists()]
    if clash:
        raise DatasetError(f"{clash[0]} already exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    for i, t in zip(pick.tolist(), targets):
        img = ds.images[i].numpy()
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        tmp = t.with_name(f".{t.name}.tmp{os.getpid()}")
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, t)
    return targets
