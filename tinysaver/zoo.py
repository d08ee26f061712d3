"""The zoo_index: one folder per zoo, a YAML manifest plus compact prediction arrays.

Layout of ``<root>/<zoo>/``::

    zoo.yaml                     manifest: dataset splits + fingerprints, one entry per model
    splits/<split>.npz           ids (str), labels (int64) of each split
    preds/<model>/<split>.npz    pred (int32), conf (float32), topk_idx, topk_prob, [logits fp16]

Every file is written atomically (temporary file, fsync, rename), so a killed run leaves either
the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import io
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import yaml

from .arrays import check_predictions, fingerprint, read_arrays
from .errors import CheckpointError, UsageError, ZooError  # noqa: F401 (ZooError re-exported)
from .manifest import PREDICTED, ModelEntry
from .schemas import IMAGENET_CLASSES, ZooManifestSchema, parse

MANIFEST = "zoo.yaml"
DEFAULT_ZOO = "fashion-mnist"  # the zoo bundled with the project, and every command's --zoo default
# the runtimes a model can run on and a zoo records latency for: the modules of tinysaver/backends,
# listed without importing them, so the command line can offer them without importing torch



ROOT_ENV = "TINYSAVER_ZOO_ROOT"


def bundled_root() -> Path:
    """The zoos that ship with tinysaver, read-only: ``tinysaver/zoo_index`` in an installed wheel,
    the checkout's ``zoo_index`` in a source tree."""
    here = Path(__file__).resolve().parent
    installed = here / "zoo_index"
    return installed if installed.is_dir() else here.parent / "zoo_index"


def user_root() -> Path:
    """The user's own zoos: ``zoos`` in the user data folder (``~/.local/share/tinysaver`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("tinysaver", appauthor=False)) / "zoos"


def search_path(root: Path | str | None = None) -> list[tuple[str, Path]]:
    """Where zoos are looked for, first match wins: ``--root``, ``$TINYSAVER_ZOO_ROOT``, the user
    data folder, then the bundled zoos (always visible, never written). (label, folder) each."""
    places = []
    if root:
        places.append(("--root", Path(root)))
    if os.environ.get(ROOT_ENV):
        places.append((f"${ROOT_ENV}", Path(os.environ[ROOT_ENV])))
    places += [("user", user_root()), ("bundled", bundled_root())]
    seen, out = set(), []
    for label, p in places:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append((label, p))
    return out


def default_root(root: Path | str | None = None) -> Path:
    """Where zoos are written: ``root`` (``--root``), else ``$TINYSAVER_ZOO_ROOT``, else the user data
    folder; never the bundled zoos (in site-packages or a checkout)."""
    if root:
        return Path(root)
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    return user_root()


def write_path(name: str, root: Path | str | None = None, log=print) -> Path:
    """The folder a command writes zoo ``name`` to: in the write root (`default_root`); a
    bundled zoo of that name is copied there first (`writable`), so a run adds to it."""
    dest = default_root(root) / name
    if not (dest / MANIFEST).is_file():
        found = zoo_path(name, root)
        if (found / MANIFEST).is_file() and is_bundled(found):
            return writable(load_zoo(str(found)), root, log).path
    return dest


def is_bundled(path: Path) -> bool:
    """Whether ``path`` lies among the bundled zoos, which are read and never written."""
    return Path(path).resolve().is_relative_to(bundled_root().resolve())


def writable(zoo: "Zoo", root: Path | str | None = None, log=print) -> "Zoo":
    """``zoo`` itself, or, for a bundled zoo, a copy of it in the write root (`default_root`)
    made first: the copy then shadows the bundled one, which stays as shipped. Says where."""
    if not is_bundled(zoo.path):
        return zoo
    dest = default_root(root) / zoo.path.name
    if (dest / MANIFEST).is_file():
        return load_zoo(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copy{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(zoo.path, tmp, ignore=shutil.ignore_patterns(".lock", "exports"))
    os.replace(tmp, dest)
    log(f"tinysaver: zoo {zoo.name!r} is bundled (read-only); copied to {dest}, where it is written from now on "
        "and shadows the bundled one")
    return load_zoo(str(dest))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, renamed over it.
    A folder at ``path``, or a place that cannot be written, is a UsageError naming it, and leaves
    no temporary file behind."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name (e.g. {path / 'selection.json'})")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {(e.strerror or str(e)).lower()}") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_yaml(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=120).encode())


def model_dirname(key: str) -> str:
    return key.replace("/", "__")


@dataclass
class Predictions:
    """Per-sample predictions of one model on one split; arrays are aligned with ``ids``."""

    model: str
    split: str
    ids: np.ndarray
    labels: np.ndarray  # -1 where unknown
    pred: np.ndarray    # (N,) int
    conf: np.ndarray    # (N,) max softmax in [0, 1]
    topk_idx: np.ndarray | None = None
    topk_prob: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.pred) else float("nan")


@dataclass
class Zoo:
    """A loaded zoo. ``manifest`` is the parsed zoo.yaml."""

    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("models", {})

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("splits", {})

    def measured(self) -> list[str]:
        """The models with per-sample predictions: profiled here or imported."""
        return [k for k, m in self.models.items() if m.get("status") in PREDICTED]

    def has_predictions(self, key: str) -> bool:
        return self.entry(key).status in PREDICTED

    def model(self, key: str) -> dict[str, Any]:
        """The raw manifest mapping of ``key``, for code that writes the manifest; readers use `entry`."""
        if key not in self.models:
            close = difflib.get_close_matches(key, list(self.models), n=5, cutoff=0.3)
            raise ZooError(f"model {key!r} is not in zoo {self.name!r}. "
                           f"{'Did you mean: ' + ', '.join(close) if close else 'Models: ' + ', '.join(self.models)}")
        return self.models[key]

    def entry(self, key: str):
        """The typed, checked `ModelEntry` of ``key``."""
        return ModelEntry.from_dict(key, self.model(key), self.path / MANIFEST)

    def model_spec(self, key: str):
        """The `ModelSpec` the entry was profiled with. A relative checkpoint
        path resolves from the checkout that holds this zoo_index (``<checkout>/zoo_index/<zoo>``)."""
        from .models import ModelSpec

        entry = self.entry(key)
        src = {k: v for k, v in entry.source.items() if k in ModelSpec.__dataclass_fields__}
        if not src.get("name") and entry.status == "imported":
            raise ZooError(f"zoo {self.name!r}: {key!r} was imported as predictions only, so it has no weights to run; "
                           f"re-import it with --weights {key}=TIMM_NAME")
        if not src.get("name"):
            raise ZooError(f"zoo {self.name!r}: entry {key!r} does not say how to build the model "
                           f"({entry.status} entries carry published facts only)")
        ck = src.get("checkpoint")
        if ck and not os.path.isabs(ck):
            # recorded relative to the checkout that held the zoo; a copied zoo folder has moved away
            # from it, so the checkout of this package (where the bundled checkpoints lie) and the
            # working directory are looked in too
            places = [self.path.parent.parent, bundled_root().parent, Path.cwd()]
            found = [p / ck for p in places if (p / ck).is_file()]
            if not found:
                raise CheckpointError(f"zoo {self.name!r}: checkpoint {ck} of {key!r} is in none of "
                                      + ", ".join(str(p) for p in dict.fromkeys(places))
                                      + " (it is recorded relative to the checkout that held the zoo)")
            src["checkpoint"] = str(found[0])
        src["label"] = key
        return ModelSpec.from_dict(src)

    def preprocess(self, key: str):
        """The `Preprocess` ``key``'s predictions were made with; None for
        an entry that records none (published facts only)."""
        from .models import Preprocess

        recorded = self.entry(key).preprocess
        return Preprocess.from_dict(recorded) if recorded else None

    @property
    def class_names(self) -> list[str] | None:
        """Class index → name, from the first split that records names (None: no split does)."""
        for split in self.splits.values():
            names = stored_class_names(split.get("class_names"))
            if names is not None:
                return names
        return None

    def preprocesses(self, keys) -> tuple:
        """The recorded preprocessing of each of ``keys`` that records one, in order (what images
        for those models are checked against: `tinysaver.budget.InputBudget`)."""
        return tuple(p for p in map(self.preprocess, keys) if p is not None)

    def load_model(self, key: str, device: str = "cpu", accept_preprocess_change: bool = False):
        """Rebuild ``key`` as it was profiled, in eval mode on ``device``.

        The recorded preprocessing is what the stored predictions were made with. When timm's
        current data config differs (a timm upgrade, say), this stops with both configs named,
        unless ``accept_preprocess_change``, which runs the model with the new config and warns.
        """
        from .models import create_model

        model = create_model(self.model_spec(key), device=device)
        old = self.preprocess(key)
        if old is not None:
            if old != model.preprocess:
                now = model.preprocess.to_dict()
                changed = {k: (v, now[k]) for k, v in old.to_dict().items() if now[k] != v}
                what = "; ".join(f"{k}: recorded {a}, now {b}" for k, (a, b) in changed.items())
                msg = (f"{key}: the preprocessing differs from the one zoo {self.name!r} recorded ({what}), "
                       "so its stored accuracy and thresholds may not hold")
                if not accept_preprocess_change:
                    raise ZooError(msg + ". Re-profile the model, or pass --accept-preprocess-change "
                                   "(accept_preprocess_change=True) to run it anyway")
                warnings.warn(msg + "; running with the new preprocessing as asked")
        return model

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self.splits:
            raise ZooError(f"zoo {self.name!r} has no split {split!r}; splits: {', '.join(self.splits) or 'none'}")
        f = self.path / "splits" / f"{split}.npz"
        if not f.is_file():
            raise ZooError(f"{f}: missing; re-run 'tinysaver profile' to rewrite it")
        z = read_arrays(f, names=("ids", "labels"), fix="re-run 'tinysaver profile' to rewrite it")
        ids, labels = z.get("ids"), z.get("labels")
        if ids is None or labels is None or ids.ndim != 1 or labels.shape != ids.shape \
                or not np.issubdtype(labels.dtype, np.integer):
            raise ZooError(f"{f}: holds no (samples,) ids and integer labels; re-run 'tinysaver profile'")
        # the fingerprint hashes ids and labels: an edited label file would otherwise select on wrong answers
        if fingerprint(ids, labels) != self.splits[split].get("fingerprint"):
            raise ZooError(f"{f}: its ids or labels differ from those split {split!r} recorded (fingerprint "
                           f"{self.splits[split].get('fingerprint')}); it was edited or replaced: restore it, or "
                           "re-run 'tinysaver profile'")
        return ids, labels

    def predictions(self, model: str, split: str) -> Predictions:
        if not self.has_predictions(model):
            raise ZooError(f"{model!r} in zoo {self.name!r} is {self.entry(model).status}: it has no predictions")
        ids, labels = self.split_arrays(split)
        f = self.path / "preds" / model_dirname(model) / f"{split}.npz"
        if not f.is_file():
            raise ZooError(f"no predictions of {model!r} on split {split!r} ({f} missing)")
        names = ("pred", "conf", "topk_idx", "topk_prob", "logits")
        z = read_arrays(f, names=("fingerprint", *names),
                        fix="re-run 'tinysaver profile' with this zoo's config to recompute it")
        if str(z.get("fingerprint")) != self.splits[split]["fingerprint"]:
            raise ZooError(f"{f}: made on different samples than split {split!r} (fingerprint mismatch)")
        arrays = {k: z.get(k) for k in names}
        check_predictions(arrays, len(ids), self.entry(model).num_classes, str(f))
        return Predictions(model, split, ids, labels, **arrays)

    def calibrated_predictions(self, model: str, split: str) -> Predictions:
        """`predictions` with the temperature-scaled confidences of ``tinysaver zoo calibrate``."""
        cal = self.entry(model).calibration
        if not cal:
            raise ZooError(f"{model!r} in zoo {self.name!r} has no calibrated confidences; run "
                           f"'tinysaver zoo calibrate --zoo {self.name}' first")
        p = self.predictions(model, split)
        f = self.path / "calibration" / model_dirname(model) / f"{split}.npz"
        if not f.is_file():
            raise ZooError(f"{f}: missing; re-run 'tinysaver zoo calibrate'")
        z = read_arrays(f, names=("fingerprint", "conf"), fix="re-run 'tinysaver zoo calibrate'")
        conf = z.get("conf")
        if str(z.get("fingerprint")) != self.splits[split]["fingerprint"] or conf is None or conf.shape != p.conf.shape:
            raise ZooError(f"{f}: made on different samples than split {split!r}; re-run 'tinysaver zoo calibrate'")
        check_predictions({"pred": p.pred, "conf": conf}, len(p.pred), None, str(f))
        p.conf = conf
        return p

    def temperature(self, model: str) -> float:
        """The fitted temperature of ``model`` (1.0 when it was never calibrated)."""
        return float((self.entry(model).calibration or {}).get("temperature", 1.0))

    def table(self) -> pd.DataFrame:
        """One row per model: status, input side (px), params, FLOPs/MACs, accuracy per split, latency per batch size."""
        rows = []
        for key, m in self.models.items():
            row: dict[str, Any] = {"model": key, "status": m.get("status"), "input_px": _input_px(m),
                                   "params_M": _m(m.get("params"))}
            row["GFLOPs"] = _g(m.get("flops"))
            row["GMACs"] = _g(m.get("macs"))
            for split, acc in (m.get("accuracy") or {}).items():
                row[f"top1_{split}"] = round(100 * acc, 2) if acc is not None else None
            for bs, lat in ((m.get("latency") or {}).get("table") or {}).items():
                row[f"ms_{bs}"] = lat["ms_per_batch"]
            cal = m.get("calibration") or {}
            if cal:
                row["T"] = round(cal["temperature"], 3)
            for split, e in (cal.get("ece") or {}).items():  # 15-bin top-label ECE in %, before and after T
                row[f"ece_{split}"] = round(100 * e["before"], 2)
                row[f"ece_T_{split}"] = round(100 * e["after"], 2)
            noisy = [bs for bs, lat in ((m.get("latency") or {}).get("table") or {}).items() if lat.get("noisy")]
            for backend, b in (m.get("backends") or {}).items():  # one column per backend and batch size
                for bs, lat in ((b.get("latency") or {}).get("table") or {}).items():
                    row[f"ms_{bs}_{backend}"] = lat["ms_per_batch"]
                    if lat.get("noisy"):
                        noisy.append(f"{bs}_{backend}")
            if noisy:  # timed on a busy machine: shown, so nobody trusts them unawares
                row["noisy"] = ",".join(noisy)
            rows.append(row)
        df = pd.DataFrame(rows)
        if "GFLOPs" in df and len(df):
            df = df.sort_values("GFLOPs", kind="stable", na_position="last").reset_index(drop=True)
        return df




def class_names_to_store(names: list[str] | None) -> list[str] | str | None:
    """A split's class names as the manifest keeps them (1000 names: ImageNet's, as one word)."""
    return IMAGENET_CLASSES if names and len(names) == 1000 else names


def stored_class_names(stored: list[str] | str | None) -> list[str] | None:
    """The class names a manifest's split entry stands for: the inverse of `class_names_to_store`."""
    if stored == IMAGENET_CLASSES:
        from .sources import imagenet_class_names

        return imagenet_class_names()
    return list(stored) if isinstance(stored, list) else None


def _input_px(m: dict) -> int | None:
    """The side of the model's input image: measured models keep their preprocessing, published ones a size."""
    size = (m.get("preprocess") or {}).get("input_size") or (m.get("published") or {}).get("img_size")
    return int(size[-1]) if isinstance(size, (list, tuple)) else (int(size) if size else None)


def _m(x: Any) -> float | None:
    return None if x is None else round(x / 1e6, 3)


def _g(x: Any) -> float | None:
    return None if x is None else round(x / 1e9, 4)


def zoo_path(name: str, root: Path | None = None) -> Path:
    """The folder of zoo ``name``: a folder path as given, else the first place of the search path
    that holds it, else where it would be written (`default_root`)."""
    p = Path(name)
    if p.is_dir() and (p / MANIFEST).is_file():
        return p
    if "/" in name or name.startswith("."):
        raise ZooError(f"{name}: not a zoo folder (no {MANIFEST})")
    for _, place in search_path(root):
        if (place / name / MANIFEST).is_file():
            return place / name
    return default_root(root) / name


def list_zoos(root: Path | str | None = None) -> list[str]:
    """The zoos in the folder ``root``, or, without it, every zoo of the search path."""
    places = [Path(root)] if root else [p for _, p in search_path()]
    return sorted({d.name for r in places if r.is_dir() for d in r.iterdir() if (d / MANIFEST).is_file()})


def find_zoos(root: Path | str | None = None) -> list[tuple[str, str, Path, list[str]]]:
    """(name, place label, folder, labels of the places it shadows) of every zoo of the search path,
    the one that wins first; a zoo of the same name lower down is shadowed, and said."""
    found: dict[str, tuple[str, Path, list[str]]] = {}
    for label, place in search_path(root):
        if not place.is_dir():
            continue
        for d in sorted(place.iterdir()):
            if (d / MANIFEST).is_file():
                if d.name in found:
                    found[d.name][2].append(label)
                else:
                    found[d.name] = (label, d, [])
    return [(n, *found[n]) for n in sorted(found)]


def zoo_summaries(root: Path | str | None = None) -> list[dict[str, Any]]:
    """One row per zoo of the search path; a zoo whose manifest cannot be read gets its error, not a crash."""
    rows = []
    for n, label, path, shadows in find_zoos(root):
        where = label + (f" (shadows {', '.join(shadows)})" if shadows else "")
        try:
            z = load_zoo(str(path))
        except ZooError as e:
            rows.append({"zoo": n, "where": where, "models": None, "measured": None, "published": None,
                         "splits": f"error: {e}"})
            continue
        st = [m.get("status") for m in z.models.values()]
        rows.append({"zoo": n, "where": where, "models": len(st), "measured": st.count("measured"),
                     "published": st.count("published"),
                     "splits": ",".join(f"{s}({v.get('samples')})" for s, v in z.splits.items())})
    return rows


def load_zoo(name: str, root: Path | str | None = None) -> Zoo:
    """Load a zoo by name (from the zoo root) or by folder path; a broken manifest is named, not dumped."""
    root = Path(root) if root else None
    path = zoo_path(name, root)
    f = path / MANIFEST
    if not f.is_file():
        known = list_zoos() if root is None else sorted({n for n, *_ in find_zoos(root)})
        looked = ", ".join(str(p) for _, p in search_path(root))
        raise ZooError(f"no zoo {name!r} in {looked}; known zoos: {', '.join(known) or 'none'}")
    try:
        with open(f) as fh:
            manifest = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ZooError(f"{f}: not valid YAML ({first}); restore it from git or re-run 'tinysaver profile'") from None
    if manifest is None:
        manifest = {}
    if not isinstance(manifest, dict):
        raise ZooError(f"{f}: a zoo manifest is a mapping with 'splits' and 'models', got a {type(manifest).__name__}")
    parse(ZooManifestSchema, manifest, str(f), ZooError)
    manifest["models"], manifest["splits"] = manifest.get("models") or {}, manifest.get("splits") or {}
    entries = [ModelEntry.from_dict(key, entry, f) for key, entry in manifest["models"].items()]  # checked now
    for split, meta in manifest["splits"].items():
        names = meta.get("class_names")
        if not isinstance(names, list):
            continue
        short = [e.key for e in entries if e.num_classes and e.num_classes > len(names)]
        if short:  # a class with no name would stop infer on its first answer
            raise ZooError(f"{f}: splits.{split}.class_names: {len(names)} names, but {short[0]} predicts "
                           f"{max(e.num_classes for e in entries if e.num_classes)} classes")
    return Zoo(manifest.get("name", path.name), path, manifest)


@contextlib.contextmanager
def zoo_lock(path: Path) -> Iterator[None]:
    """Exclusive writer lock on a zoo folder, so two profile runs never interleave writes."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ZooError(f"zoo {path} is being written by another process") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["MANIFEST", "DEFAULT_ZOO", "ROOT_ENV", "bundled_root", "user_root", "search_path", "default_root",
           "write_path", "is_bundled", "writable", "atomic_write_bytes", "atomic_write_npz",
           "atomic_write_yaml", "model_dirname", "Predictions", "Zoo", "class_names_to_store",
           "stored_class_names", "zoo_path", "list_zoos", "find_zoos", "zoo_summaries", "load_zoo",
           "zoo_lock"]
