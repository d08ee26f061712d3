"""Labelled image sets, decoded once and shared by every model in a run.

A dataset is named by a string ``KIND:ARGS`` of a kind registered in `tinysaver.sources` (an
unknown kind's error lists each registered kind's usage, e.g. ``imagefolder:PATH``). Images are
decoded by `tinysaver.decoding` within the pixel budget of `tinysaver.budget`. Every
sample has a stable string id, and a set's fingerprint hashes ids plus labels so that predictions
of different models are only compared on identical samples.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .budget import InputBudget
from .decoding import DecodedSet, RawSource, decode_all
from .errors import DatasetError
from .limits import MAX_PIXELS
from .published import shared_dir
from .sources import SOURCES, SourceKind


def source_kind(uri: str) -> tuple[SourceKind, str]:
    """The registered kind of dataset ``uri`` and its arguments (what follows ``KIND:``)."""
    kind, _, args = uri.partition(":")
    if kind not in SOURCES:
        usages = [SOURCES.get(k).usage for k in SOURCES]
        raise DatasetError(f"unknown dataset {uri!r}; use {', '.join(usages[:-1])} or {usages[-1]}")
    return SOURCES.get(kind), args


def load_dataset(uri: str, progress: bool = True, limit: int | None = None,
                 rows: tuple[int, int] | None = None,
                 max_pixels: InputBudget | int | None = MAX_PIXELS) -> DecodedSet:
    """Load and decode a dataset named as described in the module docstring.

    ``limit`` keeps the first N samples; ``rows=(start, stop)`` then keeps that range of them (a
    shard), counted before unreadable images are skipped, so shards concatenate to the whole set.
    Images over ``max_pixels`` (an `InputBudget` or a pixel cap) are
    skipped and counted like unreadable ones.
    """
    kind, args = source_kind(uri)
    if kind.arrays is not None:
        return kind.arrays(args, limit, rows)
    src = raw_source(uri, limit)
    if rows is not None:
        sl = slice(*rows)
        src = RawSource(src.name, src.ids[sl], src.labels[sl], lambda i, a=rows[0], read=src.read: read(a + i),
                        src.class_names)
    return decode_all(src, progress=progress, max_pixels=max_pixels)


def dataset_size(uri: str, limit: int | None = None) -> int:
    """How many samples ``load_dataset(uri, limit=limit)`` reads (before skipping unreadable ones),
    found by listing, not decoding."""
    kind, args = source_kind(uri)
    if kind.count is not None:
        n = kind.count(args)
        return n if limit is None else min(n, limit)
    return len(raw_source(uri, limit).ids)


SHARED_PREFIX = "../shared/"  # how the packaged configs and zoos name the shared data folder


def shared_path(args: str) -> str:
    """A path a source takes, with the packaged configs' ``../shared/…`` (the shared folder beside a
    checkout) read as the shared data folder wherever that is ($TINYSAVER_SHARED), so a packaged config
    and a bundled zoo find their data from any working folder. Other paths are as given."""
    if args.startswith(SHARED_PREFIX) and not Path(args).exists():
        return str(shared_dir() / args[len(SHARED_PREFIX):])
    return args


def raw_source(uri: str, limit: int | None = None) -> RawSource:
    """The undecoded samples of a dataset of files (not one held as arrays, like fashion-mnist)."""
    kind, args = source_kind(uri)
    if kind.listing is None:
        raise DatasetError(f"{uri} is held as decoded arrays, not as files")
    src = kind.listing(shared_path(args))
    if limit is not None:
        src = RawSource(src.name, src.ids[:limit], src.labels[:limit], src.read, src.class_names)
    return src


def sample_images(uri: str, out: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` images of dataset ``uri``, chosen with ``seed``, as ``out/<index>_<label>.png``, and
    ``out/labels.csv`` (file, class index, exact class name).

    Refuses (before writing anything) when any target file exists; each file is written to a
    temporary name and renamed, so an interrupted run leaves only whole images.
    """
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
    table = out / LABELS_CSV
    clash = [t for t in [*targets, table] if t.exists()]
    if clash:
        raise DatasetError(f"{clash[0]} already exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = ["file,label,name"]
    for i, t in zip(pick.tolist(), targets):
        img = ds.images[i].numpy()
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        tmp = t.with_name(f".{t.name}.tmp{os.getpid()}")
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, t)
        y = int(ds.labels[i])
        name = names[y] if names and 0 <= y < len(names) else ""
        rows.append(f"{t.name},{y},{_csv_field(name)}")
    # the file names hold a safe form of the class name (T-shirt-top); the exact one, as infer prints
    # it (T-shirt/top), is in labels.csv
    atomic_write_text(table, "\n".join(rows) + "\n")
    return targets


LABELS_CSV = "labels.csv"


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["source_kind", "load_dataset", "dataset_size", "SHARED_PREFIX", "shared_path", "raw_source",
           "sample_images", "LABELS_CSV", "atomic_write_text"]
