"""Profile models into a zoo: params, FLOPs/MACs, latency, and per-sample predictions per split.

The run is resumable: each prediction file and the manifest are written atomically, a model's
manifest entry appears only when all of it is done, and a restarted run skips finished models
and reuses finished prediction files (checked by dataset fingerprint), so nothing is recomputed.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .arrays import read_arrays
from .backends import DEFAULT_BACKEND
from .budget import InputBudget
from .data import dataset_size, load_dataset
from .decoding import DecodedSet
from .errors import UsageError
from .limits import MAX_PIXELS
from .measure import count_flops, device_info, latency_table, measure_latency
from .models import LoadedModel, ModelSpec, count_parameters, create_model, model_preprocess
from .policy import confidence
from .runtimes import agreement_with_predictions, backend_version, check_backend, make_runner
from .schemas import ProfileConfigSchema, parse
from .transforms import prepare_batch
from .yamlfile import read_mapping
from .zoo import (MANIFEST, ZooError, atomic_write_npz, atomic_write_yaml, class_names_to_store, load_zoo,
                  model_dirname, writable, write_path, zoo_lock)

# least time torch.utils.benchmark measures each model, backend and batch size (``--latency-seconds``)
LATENCY_SECONDS = 0.5


@dataclass
class ProfileConfig:
    """What to profile. ``splits`` maps a split name to a dataset URI (see `tinysaver.data`)."""

    zoo: str
    splits: dict[str, str]
    models: list[ModelSpec]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    eval_batch_size: int = 64
    topk: int = 5
    save_logits: bool = False
    flops_counter: str = "deepspeed"
    device: str = "cpu"
    latency_min_run_time: float = LATENCY_SECONDS
    limit: int | None = None  # first N samples of each split, for quick runs
    description: str = ""
    split_sizes: dict[str, int] | None = None  # samples per split, for --plan on data this machine lacks
    force: bool = False  # re-measure finished models (FLOPs, latency); finished prediction files are reused
    restart: bool = False  # forget the zoo's profiled splits and models first (its other files stay)
    max_pixels: int | None = MAX_PIXELS  # larger images are skipped and counted, read from the header

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("give at least one model to profile")
        if not self.splits:
            raise UsageError("give at least one split, e.g. val=imagenet:PATH")
        # the same declared format as a config file, so a config built in Python is held to it too
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["models"] = [m.to_dict() for m in self.models]
        parse(ProfileConfigSchema, d, "profile config")

    def budget(self) -> InputBudget:
        """What every split is decoded under: the pixel cap, for the image and for each model's resize of it
        (every model of the config, so a resumed run skips the same images)."""
        return InputBudget(self.max_pixels, tuple(model_preprocess(m) for m in self.models))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ProfileConfig":
        d = read_mapping(path, "a profile config (zoo, splits, models, ...)")
        d.update({k: v for k, v in overrides.items() if v is not None})
        parse(ProfileConfigSchema, d, str(path))  # every field checked against the file, before any is used
        here = Path(path).resolve().parent
        models = []
        for m in d.get("models", []):
            spec = ModelSpec.from_dict(m)
            if spec.checkpoint and not Path(spec.checkpoint).is_absolute():  # relative to the config file
                f = here / spec.checkpoint
                if not f.is_file():
                    raise UsageError(f"{path}: checkpoint {spec.checkpoint!r} of {spec.key!r} is not at {f} "
                                     "(relative paths are read from the config file's folder)")
                spec = dataclasses.replace(spec, checkpoint=str(f.resolve()))
            models.append(spec)
        d["models"] = models
        return cls(**d)


def predict(model: LoadedModel, data: DecodedSet, batch_size: int = 64, topk: int = 5,
            save_logits: bool = False, progress: bool = True, desc: str = "") -> dict[str, np.ndarray]:
    """Run ``model`` over ``data``: top-1 class, max-softmax confidence, top-k, optional logits."""
    device = next(model.module.parameters()).device
    k = min(topk, model.num_classes)
    if len(data) == 0:  # a shard whose every image was unreadable
        empty = {"pred": np.zeros(0, np.int32), "conf": np.zeros(0, np.float32),
                 "topk_idx": np.zeros((0, k), np.int32), "topk_prob": np.zeros((0, k), np.float16)}
        return {**empty, "logits": np.zeros((0, model.num_classes), np.float16)} if save_logits else empty
    preds, confs, tki, tkp, logits = [], [], [], [], []
    with torch.inference_mode():
        for s in tqdm(range(0, len(data), batch_size), desc=desc or model.key, disable=not progress, leave=False):
            x = prepare_batch(data.batch(s, s + batch_size), model.preprocess).to(device)
            out = model.module(x).float()
            c, top1 = confidence(out)
            p, i = out.softmax(-1).topk(k, dim=-1)  # the top-k table; its first column is top1's
            preds.append(top1.cpu())
            confs.append(c.cpu())
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


def load_manifest(path: Path, cfg: ProfileConfig) -> dict[str, Any]:
    """The manifest of the zoo at ``path`` as a plain mapping, or a new one named by ``cfg``; the
    writers below change it, and the caller writes it back (``atomic_write_yaml``) under the zoo's lock."""
    f = path / MANIFEST
    if f.is_file():
        with open(f) as fh:
            m = yaml.safe_load(fh) or {}
    else:
        m = {"name": cfg.zoo, "description": cfg.description, "splits": {}, "models": {}}
    m.setdefault("splits", {})
    m.setdefault("models", {})
    return m


# what a model's predictions depend on besides the images (a checkpoint's path is where it lies, not what it is)
SETTINGS = ("name", "pretrained", "num_classes", "in_chans", "input_size", "kwargs", "preprocess")


def check_resume(path: Path, manifest: dict[str, Any], cfg: ProfileConfig) -> None:
    """Stop, with one line naming the difference, when ``cfg`` asks for other inputs than the zoo at
    ``path`` was profiled on: a split's dataset or sample count (``--limit``), or the settings of a
    model already in it. A run that only resumes what matches recomputes nothing. Found only by
    listing the dataset (no image is decoded) and reading the manifest."""
    fix = f"profile into a new zoo (--zoo NAME), or pass --restart to profile {path.name} again from scratch"
    for split, uri in cfg.splits.items():
        known = manifest["splits"].get(split)
        if not known:
            continue
        if known.get("source") != uri:
            raise ZooError(f"split {split!r} of zoo {path.name} was profiled on {known.get('source')}, not {uri}; {fix}")
        had = known.get("samples", 0) + known.get("skipped_unreadable", 0)
        want = dataset_size(uri, cfg.limit)
        if had != want:
            raise ZooError(f"split {split!r} of zoo {path.name} was profiled on {had:,} samples of {uri}, this run "
                           f"asks for {want:,}" + (f" (--limit {cfg.limit})" if cfg.limit else "") + f"; {fix}")
    for spec in cfg.models:
        entry = manifest["models"].get(spec.key)
        if not entry or entry.get("status") != "measured":
            continue
        was, now = entry.get("source") or {}, spec.to_dict()
        diff = [k for k in SETTINGS if was.get(k) != now.get(k)]
        if diff:
            raise ZooError(f"model {spec.key!r} of zoo {path.name} was profiled with {diff[0]}={was.get(diff[0])!r}, "
                           f"this run gives {diff[0]}={now.get(diff[0])!r}; name it differently (label: …), or {fix}")


def restart(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Forget what profiling wrote into the zoo at ``path`` (its splits, predictions and model
    entries), keeping anything else there (trained checkpoints, say); returns the emptied manifest."""
    for folder in ("splits", "preds"):
        shutil.rmtree(path / folder, ignore_errors=True)
    manifest = {**manifest, "splits": {}, "models": {}}
    if (path / MANIFEST).is_file():
        atomic_write_yaml(path / MANIFEST, manifest)
    return manifest


def register_split(path: Path, manifest: dict[str, Any], split: str, uri: str, data: DecodedSet) -> None:
    """Record ``split``'s samples (ids and labels, written once) and its entry in ``manifest``;
    refuses a split already recorded on other samples."""
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
        "skipped_unreadable": len(data.failures), "class_names": class_names_to_store(data.class_names),
    }


def model_done(path: Path, manifest: dict[str, Any], key: str, splits: dict[str, Any]) -> bool:
    """Finished: measured, and every prediction file reads back and matches its split (a truncated
    file makes the model count as unfinished, so the run repairs it)."""
    entry = manifest["models"].get(key)
    if not entry or entry.get("status") != "measured":
        return False
    for s in splits:
        fp = (manifest["splits"].get(s) or {}).get("fingerprint")
        if s not in (entry.get("accuracy") or {}) or fp is None:
            return False
        if existing_preds(path / "preds" / model_dirname(key) / f"{s}.npz", fp) is None:
            return False
    return True


def existing_preds(f: Path, fp: str) -> dict[str, np.ndarray] | None:
    """The arrays of prediction file ``f`` when it reads back whole and was made on the split of
    fingerprint ``fp``; None otherwise (it is then computed again)."""
    if not f.is_file():
        return None
    try:
        out = read_arrays(f)
    except ZooError:  # unreadable leftovers are recomputed, never trusted
        return None
    if str(out.get("fingerprint")) != fp or "pred" not in out or "conf" not in out:
        return None
    return out


def profile(cfg: ProfileConfig, root: Path | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Profile every model of ``cfg`` into ``<root>/<zoo>``; returns the zoo folder."""
    path = write_path(cfg.zoo, root, log)  # never the bundled zoos: a copy of one, or the write root
    torch.manual_seed(0)
    created = not path.exists()
    try:
        with zoo_lock(path):
            _profile_locked(cfg, path, progress, log)
    except BaseException:
        # a run that fails before any model is done leaves no empty zoo behind
        if created and not _has_models(path):
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _has_models(path: Path) -> bool:
    try:
        with open(path / MANIFEST) as fh:
            return bool((yaml.safe_load(fh) or {}).get("models"))
    except (OSError, yaml.YAMLError):
        return False


def _profile_locked(cfg: ProfileConfig, path: Path, progress: bool, log: Callable[[str], None]) -> None:
    manifest = load_manifest(path, cfg)
    if cfg.restart:
        manifest = restart(path, manifest)
    check_resume(path, manifest, cfg)
    data: dict[str, DecodedSet] = {}
    todo = [m for m in cfg.models if cfg.force or not model_done(path, manifest, m.key, cfg.splits)]
    for m in cfg.models:
        if m not in todo:
            log(f"{m.key}: already profiled, skipping")
    if not todo:
        return
    budget = cfg.budget()
    for split, uri in cfg.splits.items():
        # decoded once, shared by all models
        data[split] = load_dataset(uri, progress=progress, limit=cfg.limit, max_pixels=budget)
        if data[split].failures:
            log(f"split {split}: skipped {len(data[split].failures)} unreadable image(s): "
                + ", ".join(i for i, _ in data[split].failures[:5]))
        register_split(path, manifest, split, uri, data[split])
    for spec in todo:
        entry = _profile_one(spec, cfg, data, path, progress, log)
        manifest["models"][spec.key] = entry
        atomic_write_yaml(path / MANIFEST, manifest)  # the manifest appears with the first finished model


def _profile_one(spec: ModelSpec, cfg: ProfileConfig, data: dict[str, DecodedSet], path: Path,
                 progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = create_model(spec, device=cfg.device)
    entry = describe_model(model, cfg.flops_counter, path)
    if cfg.batch_sizes:  # an empty list: predictions and FLOPs only, latency later (--latency-only)
        lats = measure_latency(model.module, model.preprocess.input_size, cfg.batch_sizes,
                               min_run_time=cfg.latency_min_run_time)
        entry["latency"] = {**device_info(cfg.device), "table": latency_table(lats)}
    accuracy: dict[str, float | None] = {}
    for split, ds in data.items():
        f = path / "preds" / model_dirname(spec.key) / f"{split}.npz"
        res = existing_preds(f, ds.fingerprint)
        if res is None:
            res = predict(model, ds, cfg.eval_batch_size, cfg.topk, cfg.save_logits, progress,
                          desc=f"{spec.key} [{split}]")
            atomic_write_npz(f, fingerprint=np.array(ds.fingerprint), **res)
        accuracy[split] = top1(res["pred"], ds.labels)
    entry["accuracy"] = accuracy
    log(f"{spec.key}: {entry['macs'] / 1e9:.3f} GMACs, " + ", ".join(
        f"{s} top-1 {100 * a:.2f}%" for s, a in accuracy.items() if a is not None)
        + f" ({time.perf_counter() - t0:.1f}s)")
    return entry


def top1(pred: np.ndarray, labels: np.ndarray) -> float | None:
    """Accuracy over the labelled samples (label ≥ 0); None when no sample has a label."""
    known = labels >= 0
    return float((pred[known] == labels[known]).mean()) if known.any() else None


def describe_model(model: LoadedModel, flops_counter: str, zoo_dir: Path) -> dict[str, Any]:
    """A model's manifest entry before latency and accuracy: source, preprocessing, params, FLOPs."""
    fc = count_flops(model.module, model.preprocess.input_size, flops_counter)
    source = dict(model.source)
    if source.get("checkpoint"):  # recorded relative to the checkout that holds the zoo, when inside it
        checkout = zoo_dir.resolve().parent.parent
        ck = Path(source["checkpoint"]).resolve()
        if ck.is_relative_to(checkout):
            source["checkpoint"] = os.path.relpath(ck, checkout)
    return {
        "key": model.key,
        "status": "measured",
        "source": source,
        "num_classes": model.num_classes,
        "preprocess": model.preprocess.to_dict(),
        "params": count_parameters(model.module),
        "flops": fc.flops,
        "macs": fc.macs,
        "flops_counter": fc.counter,
    }


AGREEMENT_TOP1 = 0.999   # a backend is exact when it gives eager's class on ≥ 99.9 % of samples
AGREEMENT_CONF = 1e-4    # … and every confidence within this of eager's


def profile_latency(zoo: str, backends: Sequence[str], batch_sizes: Sequence[int] = (1, 32, 128),
                    root: Path | None = None, models: Sequence[str] | None = None, limit: int | None = None,
                    min_run_time: float = LATENCY_SECONDS, log: Callable[[str], None] = print,
                    noisy_only: bool = False) -> Path:
    """Add per-backend latency rows to an existing zoo; predictions are read, never written.

    ``noisy_only``: re-time only the rows stored as noisy (timed on a busy machine), keeping the
    rest and the agreement checks as they are.

    For each measured model and backend: export (cached), check agreement with the zoo's stored
    eager predictions on every split (the first ``limit`` samples of each, when given), and measure
    latency at ``batch_sizes``. Stored under ``models.<key>.backends.<backend>`` with the runtime
    version, export time, agreement, whether it is exact, and the machine the latency came from.
    """
    for b in backends:
        check_backend(b)  # before anything runs
    if not batch_sizes or any(bs < 1 for bs in batch_sizes):
        raise UsageError("batch sizes must be ≥ 1")
    z = writable(load_zoo(zoo, root), root, log)
    keys = list(models) if models else z.measured()
    for k in keys:
        if z.entry(k).status != "measured":
            raise ZooError(f"{k!r} in zoo {zoo!r} is {z.entry(k).status}: nothing to run")
    with zoo_lock(z.path):
        data = {}
        for split, meta in z.splits.items():
            data[split] = load_dataset(meta["source"], progress=False, limit=limit)
        for key in keys:
            model = z.load_model(key)
            entry = z.manifest["models"][key]
            stored = {split: z.predictions(key, split) for split in data}  # read once, compared per backend
            for b in backends:
                if noisy_only:
                    _retime_noisy(entry, key, b, model, min_run_time, log)
                    continue
                runner = make_runner(model, b)
                agree = {split: agreement_with_predictions(model, runner, ds, stored[split])
                         for split, ds in data.items()}
                exact = all(a["top1_agreement"] >= AGREEMENT_TOP1 and a["max_conf_diff"] <= AGREEMENT_CONF
                            for a in agree.values())
                lats = measure_latency(runner, model.preprocess.input_size, batch_sizes, min_run_time=min_run_time,
                                       device="cpu")
                entry.setdefault("backends", {})[b] = {
                    "version": backend_version(b), "export_s": round(runner.export_s, 3), "exact": exact,
                    "agreement": agree, "latency": {**device_info("cpu"), "table": latency_table(lats)}}
                log(f"{key} [{b}]: " + ", ".join(f"bs{lt.batch_size} {lt.ms_per_batch:.2f} ms" for lt in lats)
                    + ("" if exact else "  (NOT exact against eager: see its agreement)") + _noisy_note(lats))
            atomic_write_yaml(z.path / MANIFEST, z.manifest)
    return z.path


def _noisy_note(lats) -> str:
    bad = [f"bs{lt.batch_size}" for lt in lats if lt.noisy]
    return (f"  (NOISY: {', '.join(bad)} timed on a busy machine; rerun with --latency-only --noisy-only when it "
            "is quiet)") if bad else ""


def _retime_noisy(entry: dict, key: str, backend: str, model, min_run_time: float, log) -> None:
    """Time again the batch sizes of ``backend`` stored as noisy; the other rows stay as they are."""
    lat = ((entry.get("backends") or {}).get(backend) or {}).get("latency")
    if lat is None and backend == DEFAULT_BACKEND:  # its latency is also the entry's own
        lat = entry.get("latency")
    sizes = sorted(int(k[2:]) for k, row in ((lat or {}).get("table") or {}).items() if row.get("noisy"))
    if not sizes:
        return
    lats = measure_latency(make_runner(model, backend), model.preprocess.input_size, sizes, min_run_time=min_run_time,
                           device="cpu")
    lat["table"] = {**lat["table"], **latency_table(lats)}
    log(f"{key} [{backend}] re-timed: " + ", ".join(f"bs{lt.batch_size} {lt.ms_per_batch:.2f} ms" for lt in lats)
        + _noisy_note(lats))


def add_published(zoo: str, entries: dict[str, dict[str, Any]], root: Path | None = None,
                  description: str = "") -> Path:
    """Write published (not measured) entries, e.g. timm's tables, into a zoo manifest."""
    path = write_path(zoo, root)
    with zoo_lock(path):
        cfg_like = ProfileConfig(zoo, {"_": "_"}, [ModelSpec("_")], description=description)
        manifest = load_manifest(path, cfg_like)
        for key, e in entries.items():
            manifest["models"][key] = {"key": key, "status": "published", **e}
        atomic_write_yaml(path / MANIFEST, manifest)
    return path


__all__: Sequence[str] = ["ProfileConfig", "profile", "profile_latency", "predict", "add_published",
                          # the writers a profiler on other executors (profile_ray) shares
                          "load_manifest", "check_resume", "restart", "register_split", "model_done", "existing_preds",
                          "describe_model", "top1"]


__all__ = ["LATENCY_SECONDS", "ProfileConfig", "predict", "load_manifest", "SETTINGS", "check_resume",
           "restart", "register_split", "model_done", "existing_preds", "profile", "top1", "describe_model",
           "AGREEMENT_TOP1", "AGREEMENT_CONF", "profile_latency", "add_published"]
