"""Build a zoo from predictions made elsewhere (``tinysaver zoo import``): no model is run.

One record per model and split, named ``{model}_{split}.{ext}`` (the split is the part after the
last underscore), in any of three formats:

- the official TinySaver record: ``.npz`` with ``label``, ``preds`` (class per sample) and ``confs``
  (its max-softmax confidence), one row per sample in the split's order;
- logits: ``.npy`` holding an (N, classes) array, or ``.npz`` with ``logits`` (and optionally
  ``label``): the top-1 class and confidence are computed here, and the logits are kept, so
  ``tinysaver zoo calibrate`` fits temperatures from them;
- ``.csv`` with a header ``id,pred,conf`` and optionally ``label``: rows are aligned across models by id.

Every model must cover the same samples of a split. Labels come from any record that has them and
must agree. Costs (GMACs or FLOPs, parameters) come from a CSV or from a zoo's entries matched by timm
name. Entries are marked ``imported``, with the files they came from.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .arrays import fingerprint, read_arrays
from .errors import UsageError, ZooError
from .policy import confidence
from .zoo import (MANIFEST, atomic_write_npz, atomic_write_yaml, class_names_to_store, default_root, load_zoo,
                  model_dirname)

FORMATS = ("official", "logits", "csv")


@dataclass
class Record:
    """One model's predictions on one split, as read from ``file``. ``ids``: None when the format
    has none (rows are then in the split's order). Shapes: (N,) each; ``logits`` (N, classes)."""

    model: str
    split: str
    file: Path
    format: str
    pred: np.ndarray
    conf: np.ndarray
    labels: np.ndarray | None = None
    ids: np.ndarray | None = None
    logits: np.ndarray | None = field(default=None, repr=False)

    def where(self, row: int | None = None) -> str:
        return f"{self.file} (model {self.model}, split {self.split}" + ("" if row is None else f", row {row}") + ")"


def parse_name(path: Path) -> tuple[str, str]:
    """``resnet50.a1_in1k_val.npz`` → ("resnet50.a1_in1k", "val")."""
    stem = path.name[: -len("".join(path.suffixes[-1:]))] if path.suffix else path.name
    model, sep, split = stem.rpartition("_")
    if not sep or not model or not split:
        raise UsageError(f"{path}: a record is named {{model}}_{{split}}.npz/.npy/.csv (e.g. resnet50_val.npz)")
    return model, split


def read_record(path: str | Path) -> Record:
    """One record file in any of `FORMATS`; raises a one-line ZooError naming the file."""
    path = Path(path)
    model, split = parse_name(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, model, split)
    if suffix not in (".npy", ".npz"):
        raise UsageError(f"{path}: a record is .npz (official or logits), .npy (logits) or .csv")
    arrays = read_arrays(path)  # headers checked against the file's size before anything is allocated
    if suffix == ".npy":
        arrays = {"logits": arrays["arr_0"]}
    labels, ids = arrays.get("label", arrays.get("labels")), arrays.get("ids")
    if "logits" in arrays:
        return _from_logits(path, model, split, arrays["logits"], labels, ids)
    if "preds" in arrays and "confs" in arrays:
        return _checked(Record(model, split, path, "official", arrays["preds"], arrays["confs"], labels, ids))
    raise ZooError(f"{path}: holds {', '.join(sorted(arrays)) or 'no arrays'}; an official record holds label, preds "
                   "and confs, a logits record logits")


def _from_logits(path, model, split, logits, labels, ids) -> Record:
    import torch

    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2 or not np.issubdtype(logits.dtype, np.floating):
        raise ZooError(f"{path}: logits are a float (samples, classes) array, got {logits.dtype} {logits.shape}")
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        raise ZooError(f"{path} (model {model}, split {split}, row {bad[0]}): logits are not finite")
    conf, pred = confidence(torch.from_numpy(logits.astype(np.float32)))
    return _checked(Record(model, split, path, "logits", pred.numpy(), conf.numpy(), labels, ids, logits))


def _read_csv(path: Path, model: str, split: str) -> Record:
    with utf8_text(path) as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("id", "pred", "conf") if c not in cols]
        if missing:
            raise ZooError(f"{path}: the header needs id,pred,conf[,label]; missing {', '.join(missing)}")
        has_label = "label" in cols
        ids, pred, conf, labels = [], [], [], []
        for row, r in enumerate(reader):
            r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
            try:
                ids.append(r["id"])
                pred.append(int(r["pred"]))
                conf.append(float(r["conf"]))
                if has_label:
                    labels.append(int(r["label"]))
            except ValueError:
                raise ZooError(f"{path} (model {model}, split {split}, row {row}): pred and label are integers and "
                               f"conf a number, got {r}") from None
    return _checked(Record(model, split, path, "csv", np.array(pred), np.array(conf, np.float64),
                           np.array(labels) if has_label else None, np.array(ids, dtype=str)))


@contextlib.contextmanager
def utf8_text(path: str | Path, what: str = "a CSV file"):
    """``path`` opened as UTF-8 text (a BOM is dropped); a file in another encoding (Latin-1, say) is
    a ZooError naming the file and the first bad byte's line, not a UnicodeDecodeError."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            yield f
        except UnicodeDecodeError as e:
            line = path_line_of(Path(path), e.start)
            raise ZooError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); {what} is read "
                           "as UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None


def path_line_of(path: Path, offset: int) -> int:
    # the decoder's offset counts within its buffer; the line is counted from the file's bytes
    with open(path, "rb") as fh:
        return fh.read(offset + 1).count(b"\n") + 1


def read_class_names(path: str | Path) -> list[str]:
    """One class name per non-empty line of a UTF-8 text file (``zoo import --class-names``)."""
    try:
        with utf8_text(path, "a class-names file") as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"--class-names {path}: {(e.strerror or str(e)).lower()}") from None


def _checked(r: Record) -> Record:
    """Shapes, integer classes and confidences in [0, 1]; the first bad row named."""
    n = len(r.pred)
    for name in ("conf", "labels", "ids"):
        a = getattr(r, name)
        if a is not None and (np.ndim(a) != 1 or len(a) != n):
            raise ZooError(f"{r.where()}: {name} has shape {np.shape(a)}, the predictions ({n},)")
    if np.ndim(r.pred) != 1 or n == 0:
        raise ZooError(f"{r.where()}: predictions are one class per sample, got shape {np.shape(r.pred)}")
    for name in ("pred", "labels"):
        a = getattr(r, name)
        if a is None:
            continue
        if not np.issubdtype(a.dtype, np.integer):
            if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
                bad = int(np.flatnonzero(~np.isfinite(a.astype(np.float64)) | (a != np.round(a)))[0]) \
                    if np.issubdtype(a.dtype, np.number) else 0
                raise ZooError(f"{r.where(bad)}: {name} are class indices, got {a[bad]!r}")
            setattr(r, name, a.astype(np.int64))
        neg = np.flatnonzero(getattr(r, name) < 0)
        if len(neg):
            raise ZooError(f"{r.where(int(neg[0]))}: {name} are class indices ≥ 0, got {getattr(r, name)[neg[0]]}")
    conf = np.asarray(r.conf, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(conf) | (conf < 0) | (conf > 1))
    if len(bad):
        raise ZooError(f"{r.where(int(bad[0]))}: confidences lie in [0, 1], got {conf[bad[0]]}")
    r.pred, r.conf = np.asarray(r.pred, np.int64), conf.astype(np.float32)
    if r.ids is not None:
        r.ids = np.asarray(r.ids).astype(str)
        seen, dup = set(), None
        for i, v in enumerate(r.ids):
            if v in seen:
                dup = i
                break
            seen.add(v)
        if dup is not None:
            raise ZooError(f"{r.where(dup)}: sample id {str(r.ids[dup])!r} appears twice")
    return r


def align(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[Record]]:
    """The split's sample ids and labels, and its records in that order (all of one split).

    Records with ids are aligned to the first one's order by id; records without are taken in row
    order, which must then be the only order (all of the same length). Labels must agree wherever given.
    """
    first = records[0]
    n = len(first.pred)
    with_ids = [r for r in records if r.ids is not None]
    if with_ids and len(with_ids) != len(records):
        no = next(r for r in records if r.ids is None)
        raise ZooError(f"{no.where()}: has no sample ids while {with_ids[0].file.name} has; give every record of a "
                       "split ids (csv) or none (rows in one order)")
    ids = with_ids[0].ids if with_ids else np.array([str(i) for i in range(n)])
    out = []
    for r in records:
        if len(r.pred) != n:
            raise ZooError(f"{r.where()}: {len(r.pred)} samples, but {first.file.name} has {n}: every model must cover "
                           "the same samples")
        if r.ids is not None and not np.array_equal(r.ids, ids):
            pos = {v: i for i, v in enumerate(r.ids)}
            missing = next((v for v in ids.tolist() if v not in pos), None)
            if missing is not None:
                known = set(ids.tolist())
                extra_row = next(i for i, v in enumerate(r.ids.tolist()) if v not in known)
                raise ZooError(f"{r.where(extra_row)}: sample id {str(r.ids[extra_row])!r} is not in {first.file.name}, "
                               f"which has {missing!r} that this file lacks")
            order = np.array([pos[v] for v in ids])
            r = Record(r.model, r.split, r.file, r.format, r.pred[order], r.conf[order],
                       None if r.labels is None else r.labels[order], ids,
                       None if r.logits is None else r.logits[order])
        out.append(r)
    labelled = [r for r in out if r.labels is not None]
    if not labelled:
        raise ZooError(f"split {first.split!r}: no record gives labels (an official record's 'label', a csv's "
                       "label column); the selector needs them")
    labels = labelled[0].labels
    for r in labelled[1:]:
        bad = np.flatnonzero(r.labels != labels)
        if len(bad):
            raise ZooError(f"{r.where(int(bad[0]))}: label {r.labels[bad[0]]} disagrees with {labelled[0].file.name}'s "
                           f"{labels[bad[0]]} for sample {str(ids[bad[0]])!r}")
    return ids, labels, out


def read_costs(path: str | Path) -> dict[str, dict]:
    """``model`` plus any of ``gmacs``/``macs``/``gflops``/``flops`` and ``params``/``params_m`` per
    row → {model: {"macs", "flops", "params"}} (FLOPs = 2 × MACs where only one is given)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--costs {path}: no such file")
    out = {}
    with utf8_text(path) as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "model" not in cols or not {"gmacs", "macs", "gflops", "flops"} & set(cols):
            raise ZooError(f"{path}: the header needs model and one of gmacs, macs, gflops, flops "
                           "(optionally params or params_m)")
        for row, r in enumerate(reader):
            get = lambda k: (r.get(cols[k]) or "").strip() if k in cols else ""  # noqa: E731
            try:
                macs = float(get("gmacs")) * 1e9 if get("gmacs") else float(get("macs")) if get("macs") else None
                flops = float(get("gflops")) * 1e9 if get("gflops") else float(get("flops")) if get("flops") else None
                params = float(get("params_m")) * 1e6 if get("params_m") else float(get("params")) if get("params") else None
            except ValueError:
                raise ZooError(f"{path} (row {row}): costs are numbers, got {dict(r)}") from None
            if macs is None and flops is None:
                raise ZooError(f"{path} (row {row}): model {get('model')!r} has no MACs or FLOPs")
            for name, v in (("macs", macs), ("flops", flops), ("params", params)):
                if v is not None and not (np.isfinite(v) and v > 0):
                    raise ZooError(f"{path} (row {row}): {name} must be > 0, got {v}")
            out[get("model")] = {"macs": int(round(macs if macs is not None else flops / 2)),
                                 "flops": int(round(flops if flops is not None else 2 * macs)),
                                 **({"params": int(round(params))} if params is not None else {}),
                                 "from": str(path)}
    return out


def costs_from_zoo(zoo_name: str, models: Sequence[str], root: Path | None = None) -> dict[str, dict]:
    """Costs of ``models`` from zoo ``zoo_name``'s entries (a catalog's published ones, or measured),
    matched by key, else by timm architecture (the name before the pretrained tag) when one matches."""
    try:
        z = load_zoo(zoo_name, root)
    except ZooError:
        if root is None:
            raise
        z = load_zoo(zoo_name)  # a catalog in the package's zoo_index serves an import anywhere
    out = {}
    for m in models:
        key = m if m in z.models else None
        if key is None:
            arch = m.split(".")[0]
            cands = [k for k in z.models if k.split(".")[0] == arch]
            key = cands[0] if len(cands) == 1 else None
        e = z.entry(key) if key else None
        if e and (e.macs or e.flops):
            out[m] = {"macs": int(e.macs if e.macs else e.flops / 2), "flops": int(e.flops if e.flops else 2 * e.macs),
                      **({"params": int(e.params)} if e.params else {}),
                      **({"flops_counter": e.flops_counter} if e.flops_counter else {}),
                      "from": f"zoo {z.name}: {key}"}
    return out




def import_zoo(name: str, files: Sequence[str | Path], costs: str | Path | None = None, costs_from: str | None = None,
               root: str | Path | None = None, num_classes: int | None = None, class_names: Sequence[str] | None = None,
               weights: dict[str, str] | None = None, description: str = "", force: bool = False) -> Path:
    """Write zoo ``name`` under ``root`` from record ``files`` (see the module's docstring).

    ``costs``: a CSV of costs; ``costs_from``: a zoo whose entries give them. Every model needs one,
    so that the selector can rank it. ``weights``: {model: timm name} for models ``infer`` and
    ``serve`` may then build (pretrained weights from the hub); others are predictions only.
    The zoo is written in a temporary folder beside its place and moved there whole.
    """
    root = Path(root) if root else default_root()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(f"a zoo name is letters, digits, '.', '_' and '-', got {name!r}")
    dest = root / name
    if dest.exists() and not force:
        raise UsageError(f"zoo {name!r} already exists in {root}; pick another name or pass --force to replace it")
    if not files:
        raise UsageError("give at least one record file")
    records = [read_record(f) for f in files]
    seen: dict[tuple[str, str], Path] = {}
    for r in records:
        if (r.model, r.split) in seen:
            raise UsageError(f"{r.file} and {seen[r.model, r.split]} are both model {r.model} on split {r.split}")
        seen[r.model, r.split] = r.file
    models = list(dict.fromkeys(r.model for r in records))
    splits = list(dict.fromkeys(r.split for r in records))
    for s in splits:
        lacking = [m for m in models if (m, s) not in seen]
        if lacking:
            raise ZooError(f"split {s!r}: no record of {', '.join(lacking)} ({lacking[0]}_{s}.npz or .csv); every model "
                           "needs every split")
    cost = dict(read_costs(costs) if costs else {})
    if costs_from:
        cost = {**costs_from_zoo(costs_from, models, root), **cost}
    no_cost = [m for m in models if m not in cost]
    if no_cost:
        raise ZooError(f"no cost for {', '.join(no_cost)}: give --costs FILE.csv (model,gmacs[,params_m]) or "
                       "--costs-from ZOO (e.g. imagenet-catalog) holding them; the selector ranks savers by cost")
    widths = {r.logits.shape[1] for r in records if r.logits is not None}
    if len(widths) > 1:
        raise ZooError(f"the logits records have different class counts: {sorted(widths)}")
    by_split = {s: align([r for r in records if r.split == s]) for s in splits}
    top = max(max(int(r.pred.max()), int(lab.max())) for ids, lab, rs in by_split.values() for r in rs) + 1
    ncls = num_classes or (widths.pop() if widths else None) or (len(class_names) if class_names else None) or top
    for ids, labels, rs in by_split.values():
        for r in rs:
            for what, a in (("pred", r.pred), ("label", labels)):
                bad = np.flatnonzero(a >= ncls)
                if len(bad):
                    raise ZooError(f"{r.where(int(bad[0]))}: {what} {a[bad[0]]} is out of range for {ncls} classes")
    if class_names is not None and len(class_names) != ncls:
        raise UsageError(f"{len(class_names)} class names for {ncls} classes")
    unknown = sorted(set(weights or {}) - set(models))
    if unknown:
        raise UsageError(f"--weights names {', '.join(unknown)}, which no record holds; models: {', '.join(models)}")

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=root))
    try:
        manifest = {"name": name, "description": description or f"imported from {len(records)} record files",
                    "splits": {}, "models": {}}
        for s, (ids, labels, _) in by_split.items():
            fp = fingerprint(ids, labels)
            atomic_write_npz(tmp / "splits" / f"{s}.npz", ids=ids, labels=labels)
            manifest["splits"][s] = {"source": f"imported:{Path(files[0]).resolve().parent}", "fingerprint": fp,
                                     "samples": len(ids), "skipped_unreadable": 0,
                                     "class_names": class_names_to_store(list(class_names) if class_names else None)}
        today = _dt.date.today().isoformat()
        for m in models:
            accuracy, files_of, fmt = {}, {}, set()
            for s, (ids, labels, rs) in by_split.items():
                r = next(r for r in rs if r.model == m)
                extra = {"logits": r.logits.astype(np.float32)} if r.logits is not None else {}
                atomic_write_npz(tmp / "preds" / model_dirname(m) / f"{s}.npz",
                                 fingerprint=np.array(manifest["splits"][s]["fingerprint"]),
                                 pred=r.pred.astype(np.int32), conf=r.conf, **extra)
                accuracy[s] = float((r.pred == labels).mean())
                files_of[s], fmt = str(r.file.resolve()), fmt | {r.format}
            c = cost[m]
            source = {"kind": "timm", "name": weights[m], "pretrained": True} if weights and m in weights else {}
            manifest["models"][m] = {
                "key": m, "status": "imported", "source": source, "num_classes": int(ncls),
                "params": c.get("params"), "flops": c["flops"], "macs": c["macs"],
                "flops_counter": c.get("flops_counter", "given"), "accuracy": accuracy,
                "imported": {"files": files_of, "format": ",".join(sorted(fmt)), "costs": c["from"], "on": today}}
        atomic_write_yaml(tmp / MANIFEST, manifest)
        load_zoo(str(tmp))  # the written zoo reads back, or nothing replaces anything
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            os.replace(dest, old / name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


__all__ = ["FORMATS", "Record", "align", "costs_from_zoo", "import_zoo", "parse_name", "read_costs", "read_record"]
