"""Array files read safely, and the one check of stored predictions.

``.npy`` and ``.npz`` headers declare a shape and a dtype; a 200-byte file can claim a 36 TiB array,
which numpy would try to allocate. `read_arrays` reads each header first and refuses an array
larger than the bytes that hold it (or than `MAX_ARRAY_BYTES`), never unpickles, and turns a
truncated or corrupt file into one line naming it. `check_predictions` is what every reader of
a zoo (query, infer, serve, zoo import, the ESN) trusts stored predictions by: length, dtype, class
range, and finite confidences in [0, 1].
"""
from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from .errors import TinysaverError, ZooError

MAX_ARRAY_BYTES = 8 * 2**30  # no array of a zoo comes near (ImageNet-val logits as float32: 200 MB)


def _header(fh: IO[bytes], where: str, error: type[TinysaverError]) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(fh, max_header_size=10_000)
    except (ValueError, EOFError, OSError, SyntaxError) as e:
        raise error(f"{where}: not an array file ({' '.join(str(e).split())[:100]})") from None
    if dtype.hasobject:
        raise error(f"{where}: holds Python objects, which are never unpickled; store numbers or text")
    return shape, fortran, dtype


def _check_size(shape, dtype: np.dtype, held: int, where: str, error) -> None:
    want = math.prod(shape) * dtype.itemsize
    if want > min(held, MAX_ARRAY_BYTES):
        raise error(f"{where}: its header claims a {'×'.join(map(str, shape)) or 'scalar'} {dtype} array "
                    f"({want:,} bytes) but {held:,} bytes hold it; the file is truncated or forged")


def read_arrays(path: str | os.PathLike, error: type[TinysaverError] = ZooError,
                names: tuple[str, ...] | None = None, fix: str = "") -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (those in ``names``, or all) or of a ``.npy`` (as ``{"arr_0": …}``).

    Each header is checked against the bytes that hold it before anything is allocated; anything
    unreadable raises ``error`` with the file named, never a numpy or zipfile exception, and ``fix``
    (what to do about it) after a semicolon."""
    try:
        return _read_arrays(Path(path), error, names)
    except TinysaverError as e:
        if not fix:
            raise
        raise type(e)(f"{e}; {fix}") from None


def _read_arrays(path: Path, error: type[TinysaverError], names: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    where = str(path)
    try:
        size = path.stat().st_size
        if path.suffix.lower() == ".npy" or not zipfile.is_zipfile(path):
            if path.suffix.lower() != ".npy":
                raise error(f"{where}: cannot read it as .npz (truncated, or not a zip archive)")
            with open(path, "rb") as fh:
                shape, fortran, dtype = _header(fh, where, error)
                _check_size(shape, dtype, size - fh.tell(), where, error)
                return {"arr_0": _read_body(fh, shape, dtype, fortran)}
        out = {}
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if names is not None and key not in names:
                    continue
                with zf.open(info) as fh:
                    shape, fortran, dtype = _header(fh, f"{where}: {key}", error)
                    _check_size(shape, dtype, info.file_size - fh.tell(), f"{where}: {key}", error)
                    out[key] = _read_body(fh, shape, dtype, fortran)
        return out
    except TinysaverError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, KeyError) as e:
        what = (e.strerror or str(e)) if isinstance(e, OSError) else ' '.join(str(e).split())[:100]
        raise error(f"{where}: cannot be read ({what or type(e).__name__.lower()}); the file is truncated or "
                    "corrupt") from None


def _read_body(fh: IO[bytes], shape, dtype: np.dtype, fortran: bool) -> np.ndarray:
    n = math.prod(shape)
    data = fh.read(n * dtype.itemsize)
    if len(data) != n * dtype.itemsize:
        raise EOFError("the array's data ends early")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def fingerprint(ids: Sequence[str], labels: np.ndarray) -> str:
    """sha256 over the ordered ids and labels (first 16 hex digits): what a split records, so that
    predictions made on other samples, or labels edited afterwards, are told apart."""
    h = hashlib.sha256()
    for i, y in zip(np.asarray(ids).tolist(), np.asarray(labels).tolist()):
        h.update(f"{i}\t{y}\n".encode())
    return h.hexdigest()[:16]


def check_predictions(arrays: dict[str, np.ndarray | None], n: int, num_classes: int | None, where: str,
                      error: type[TinysaverError] = ZooError) -> None:
    """Stored predictions of ``n`` samples: ``pred`` (n,) integer classes in [0, num_classes), ``conf``
    (n,) finite max-softmax confidences in [0, 1], and ``topk_idx``/``topk_prob``/``logits`` with n
    rows when present. The first fault raises ``error``, naming the array and the first bad row."""
    pred, conf = arrays.get("pred"), arrays.get("conf")
    if pred is None or conf is None:
        raise error(f"{where}: holds no pred/conf arrays")
    for name, a in arrays.items():
        if a is not None and (a.ndim < 1 or len(a) != n):
            raise error(f"{where}: {name} has {a.shape[0] if a.ndim else 0} rows, the split has {n} samples")
    if pred.ndim != 1 or not np.issubdtype(pred.dtype, np.integer):
        raise error(f"{where}: pred must be (samples,) integer classes, got {pred.dtype} {pred.shape}")
    if conf.ndim != 1 or not np.issubdtype(conf.dtype, np.floating):
        raise error(f"{where}: conf must be (samples,) confidences, got {conf.dtype} {conf.shape}")
    bad = np.flatnonzero((pred < 0) | (pred >= num_classes)) if num_classes else np.flatnonzero(pred < 0)
    if len(bad):
        raise error(f"{where}: pred row {bad[0]} is class {int(pred[bad[0]])}, outside the "
                    f"{num_classes or 'non-negative'}{' classes' if num_classes else ' class indices'}")
    bad = np.flatnonzero(~(np.isfinite(conf) & (conf >= 0) & (conf <= 1)))
    if len(bad):
        raise error(f"{where}: conf row {bad[0]} is {float(conf[bad[0]])!r}; a confidence is a finite number in [0, 1]")


__all__ = ["MAX_ARRAY_BYTES", "check_predictions", "fingerprint", "read_arrays"]
