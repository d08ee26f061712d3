"""Profile models into a zoo: params, FLOPs/MACs, latency, and per-sample predictions per split.

The run is resumable: each prediction file and the manifest are written atomically, a model's
manifest entry appears only when all of it is done, and a restarted run skips finished models
and reuses finished prediction files (checked by dataset fingerprint), so nothing is recomputed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data import DecodedSet, load_dataset
from .measure import count_flops, device_info, latency_table, measure_latency
from .models import LoadedModel, ModelSpec, count_parameters, create_model
from .transforms import prepare_batch
from .zoo import (MANIFEST, ZooError, atomic_write_npz, atomic_write_yaml, model_dirname, zoo_lock, zoo_path)


@dataclass
class ProfileConfig:
    """What to profile. ``splits`` maps a split name to a dataset URI (see :mod:`tinysaver.data`)."""

    zoo: str
    splits: dict[str, str]
    models: list[ModelSpec]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    eval_batch_size: int = 64
    topk: int = 5
    save_logits: bool = False
    flops_counter: str = "deepspeed"
    device: str = "cpu"
    latency_min_run_time: float = 0.5
    limit: int | None = None  # first N samples of each split, for quick runs
    description: str = ""
    force: bool = False  # re-measure finished models (FLOPs, latency); finished prediction files are reused

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model to profile")
        if not self.splits:
            raise ValueError("give at least one split, e.g. val=imagenet:PATH")
        keys = [m.key for m in self.models]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"model names must be unique in a zoo; repeated: {sorted(dup)}")
        if any(b < 1 for b in self.batch_sizes) or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be ≥ 1")
        if self.topk < 1:
            raise ValueError("topk must be ≥ 1")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ProfileConfig":
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        d.update({k: v for k, v in overrides.items() if v is not None})
        d["models"] = [ModelSpec.from_dict(m) for m in d.get("models", [])]
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**d)


def predict(model: LoadedModel, data: DecodedSet, batch_size: int = 64, topk: int = 5,
            save_logits: bool = False, progress: bool = True, desc: str = "") -> dict[str, np.ndarray]:
    """Run ``model`` over ``data``: top-1 class, max-softmax confidence, top-k, optional logits."""
    from tqdm.auto import tqdm

    device = next(model.module.parameters()).device
    k = min(topk, model.num_classes)
    preds, confs, tki, tkp, logits = [], [], [], [], []
    with torch.inference_mode():
        for s in tqdm(range(0, len(data), batch_size), desc=desc or model.key, disable=not progress, leave=False):
            x = prepare_batch(data.batch(s, s + batch_size), model.preprocess).to(device)
            out = model.module(x).float()
            prob = out.softmax(-1)
            p, i = prob.topk(k, dim=-1)
            preds.append(i[:, 0].cpu())
            confs.append(p[:, 0].cpu())
            tki.append(i.cpu())
            tkp.append(p.cpu())
            if save_logits:
                logits.append(out.half().cpu())
    res = {
        "pred": torch.cat(preds).numpy().astype(np.int32),
        "conf": torch.cat(confs).numpy().astype(np.float32),
        "topk_idx": torch.cat(tki).numpy().astype(np.int32),
        "topk_prob": torch.cat(tkp).numpy().astype(np.float16),
    }
    if save_logits:
        res["logits"] = torch.cat(logits).numpy()
    return res


def _load_manifest(path: Path, cfg: ProfileConfig) -> dict[str, Any]:
    import yaml

    f = path / MANIFEST
    if f.is_file():
        with open(f) as fh:
            m = yaml.safe_load(fh) or {}
    else:
        m = {"name": cfg.zoo, "description": cfg.description, "splits": {}, "models": {}}
    m.setdefault("splits", {})
    m.setdefault("models", {})
    return m


def _register_split(path: Path, manifest: dict[str, Any], split: str, uri: str, data: DecodedSet) -> None:
    known = manifest["splits"].get(split)
    if known and known["fingerprint"] != data.fingerprint:
        raise ZooError(
            f"split {split!r} of zoo {path.name} was made on other samples (fingerprint {known['fingerprint']}, "
            f"now {data.fingerprint}); profile into a new zoo instead of mixing them"
        )
    if not known or not (path / "splits" / f"{split}.npz").is_file():
        atomic_write_npz(path / "splits" / f"{split}.npz", ids=np.array(data.ids), labels=data.labels)
    manifest["splits"][split] = {
        "source": uri, "fingerprint": data.fingerprint, "samples": len(data),
        "skipped_unreadable": len(data.failures), "class_names": "imagenet" if data.class_names and len(
            data.class_names) == 1000 else data.class_names,
    }


def _model_done(path: Path, entry: dict[str, Any] | None, splits: dict[str, Any]) -> bool:
    if not entry or entry.get("status") != "measured":
        return False
    return all(s in (entry.get("accuracy") or {}) and (path / "preds" / model_dirname(entry["key"]) / f"{s}.npz").is_file()
               for s in splits)


def _existing_preds(f: Path, fp: str) -> dict[str, np.ndarray] | None:
    if not f.is_file():
        return None
    try:
        with np.load(f) as z:
            if str(z["fingerprint"]) != fp:
                return None
            return {k: z[k] for k in z.files}
    except Exception:  # unreadable leftovers are recomputed, never trusted
        return None


def profile(cfg: ProfileConfig, root: Path | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Profile every model of ``cfg`` into ``<root>/<zoo>``; returns the zoo folder."""
    path = zoo_path(cfg.zoo, root) if root is None else Path(root) / cfg.zoo
    torch.manual_seed(0)
    with zoo_lock(path):
        manifest = _load_manifest(path, cfg)
        todo = [m for m in cfg.models
                if cfg.force or not _model_done(path, manifest["models"].get(m.key), cfg.splits)]
        for m in cfg.models:
            if m not in todo:
                log(f"{m.key}: already profiled, skipping")
        if not todo:
            return path
        data: dict[str, DecodedSet] = {}
        for split, uri in cfg.splits.items():
            data[split] = load_dataset(uri, progress=progress, limit=cfg.limit)  # decoded once, shared by all models
            if data[split].failures:
                log(f"split {split}: skipped {len(data[split].failures)} unreadable image(s): "
                    + ", ".join(i for i, _ in data[split].failures[:5]))
            _register_split(path, manifest, split, uri, data[split])
        atomic_write_yaml(path / MANIFEST, manifest)
        for spec in todo:
            manifest["models"][spec.key] = _profile_one(spec, cfg, data, path, progress, log)
            atomic_write_yaml(path / MANIFEST, manifest)
    return path


def _profile_one(spec: ModelSpec, cfg: ProfileConfig, data: dict[str, DecodedSet], path: Path,
                 progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = create_model(spec, device=cfg.device)
    shape = model.preprocess.input_size
    fc = count_flops(model.module, shape, cfg.flops_counter)
    lats = measure_latency(model.module, shape, cfg.batch_sizes, min_run_time=cfg.latency_min_run_time)
    accuracy: dict[str, float | None] = {}
    for split, ds in data.items():
        f = path / "preds" / model_dirname(spec.key) / f"{split}.npz"
        res = _existing_preds(f, ds.fingerprint)
        if res is None:
            res = predict(model, ds, cfg.eval_batch_size, cfg.topk, cfg.save_logits, progress,
                          desc=f"{spec.key} [{split}]")
            atomic_write_npz(f, fingerprint=np.array(ds.fingerprint), **res)
        known = ds.labels >= 0
        accuracy[split] = float((res["pred"][known] == ds.labels[known]).mean()) if known.any() else None
    entry = {
        "key": spec.key,
        "status": "measured",
        "source": model.source,
        "num_classes": model.num_classes,
        "preprocess": model.preprocess.to_dict(),
        "params": count_parameters(model.module),
        "flops": fc.flops,
        "macs": fc.macs,
        "flops_counter": fc.counter,
        "latency": {**device_info(cfg.device), "table": latency_table(lats)},
        "accuracy": accuracy,
    }
    log(f"{spec.key}: {fc.macs / 1e9:.3f} GMACs, " + ", ".join(
        f"{s} top-1 {100 * a:.2f}%" for s, a in accuracy.items() if a is not None)
        + f" ({time.perf_counter() - t0:.1f}s)")
    return entry


def add_published(zoo: str, entries: dict[str, dict[str, Any]], root: Path | None = None,
                  description: str = "") -> Path:
    """Write published (not measured) entries, e.g. timm's tables, into a zoo manifest."""
    path = zoo_path(zoo, root) if root is None else Path(root) / zoo
    with zoo_lock(path):
        cfg_like = ProfileConfig(zoo, {"_": "_"}, [ModelSpec("_")], description=description)
        manifest = _load_manifest(path, cfg_like)
        for key, e in entries.items():
            manifest["models"][key] = {"key": key, "status": "published", **e}
        atomic_write_yaml(path / MANIFEST, manifest)
    return path


__all__: Sequence[str] = ["ProfileConfig", "profile", "predict", "add_published"]
