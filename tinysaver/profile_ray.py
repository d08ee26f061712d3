"""Profile a zoo on Ray: model × data-shard units, retried, staged, and merged as a local run would.

Why actors: a worker actor keeps the model it loaded and runs shard after shard of it, then
moves on to the next model in the same process; a task per unit would reload the model (and
import torch) every time. A pool as large as the cluster's slots takes units as it frees up,
preferring the model it holds. Each (split, shard) is decoded once, by the first worker that
needs it, and the decoded tensor goes through the object store to every other model. Each worker
asks Ray for ``num_cpus``/``num_gpus``, so one config runs on a laptop or on a GPU cluster
(``RAY_ADDRESS``).

Faults:

- a worker lost with its process or its whole node fails its unit, and the driver gives the unit
  to another worker (the shard is decoded again if it was lost with the node). A replacement
  worker starts where the cluster has room; otherwise the pool shrinks with the cluster. Each
  rerun is counted (``retries``), and each lost worker (``workers_lost``);
- every finished unit is written atomically to ``<zoo>.staging/`` next to the zoo, so a rerun
  after the *driver* died computes only the units that are not there;
- when every unit of a model is in, the driver concatenates its shards into the zoo's usual
  prediction files and then adds the model's manifest entry, each write atomic: the model is
  either merged whole or not at all.

Latency is not measured here (a shared cluster's timings mislead): run
``tinysaver profile --latency-only`` on the machine that will serve the cascade.

Ray is an optional extra (``tinysaver[ray]``): it is imported when this module is, and
`check_config` names the extra when it is missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError, RayTaskError
except ImportError:  # the optional extra; check_config names it
    ray = None
from tqdm.auto import tqdm

from .arrays import read_arrays
from .data import dataset_size, load_dataset
from .decoding import DecodedSet
from .errors import UsageError
from .models import ModelSpec, create_model, resolve_kind
from .profiler import (ProfileConfig, check_resume, describe_model, existing_preds, load_manifest, model_done, predict,
                       register_split, restart, top1)
from .ray_local import set_local_ray_env
from .zoo import (MANIFEST, ZooError, atomic_write_npz, atomic_write_yaml, model_dirname, stored_class_names, write_path,
                  zoo_lock)

MAX_RETRIES = 3


@dataclass(frozen=True)
class Unit:
    """One model on rows [start, stop) of one split (rows counted before unreadable images are skipped)."""

    model: str
    split: str
    shard: int
    start: int
    stop: int


def shard_bounds(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges covering [0, n), their edges on multiples of ``align`` (the
    eval batch size, so a shard's batches are the local run's batches); empty ranges are dropped."""
    step = -(-n // shards)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)] if n else []


def staging_dir(zoo_dir: Path) -> Path:
    return zoo_dir.parent / f"{zoo_dir.name}.staging"


def _unit_tag(cfg: ProfileConfig, spec_dict: dict, split: str) -> str:
    # a staged unit is reused only by a run that would compute the very same thing
    what = json.dumps([spec_dict, cfg.splits[split], cfg.topk, cfg.save_logits], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def unit_file(staging: Path, unit: Unit, tag: str) -> Path:
    return staging / model_dirname(unit.model) / f"{unit.split}-{unit.start:09d}-{unit.stop:09d}-{tag}.npz"


def _staged(f: Path) -> dict[str, np.ndarray] | None:
    try:
        out = read_arrays(f)  # headers checked against the file first, like every array a zoo reads
    except ZooError:  # a leftover that does not read back is computed again
        return None
    return out if {"ids", "labels", "pred", "conf"} <= set(out) else None


def check_config(cfg: ProfileConfig, shards: int, gpus_per_task: float, cpus_per_task: float) -> dict[str, int]:
    """Everything that can be checked before a task starts: names, checkpoints, data, options.
    Returns the number of rows of each split."""
    if ray is None:
        raise UsageError("the ray backend needs Ray: pip install 'tinysaver[ray]'")
    if shards < 1:
        raise UsageError(f"--shards must be ≥ 1, got {shards}")
    if gpus_per_task < 0 or cpus_per_task <= 0:
        raise UsageError("--gpus-per-task must be ≥ 0 and CPUs per task > 0")
    for spec in cfg.models:
        resolve_kind(spec.name)  # unknown names fail here, listing close matches
        if spec.checkpoint and not Path(spec.checkpoint).is_file():
            raise UsageError(f"{spec.key}: checkpoint {spec.checkpoint} does not exist")
    return {split: dataset_size(uri, cfg.limit) for split, uri in cfg.splits.items()}


class ModelWorker:
    """Runs units as a Ray actor (``ray.remote(ModelWorker)``), keeping the model it last loaded: a
    model loads once per worker, and the worker process (with torch imported) serves model after
    model."""

    def __init__(self, device: str):
        self.device, self.model = device, None

    def _load(self, spec: dict):
        spec = ModelSpec.from_dict(spec)
        if self.model is None or self.model.key != spec.key:
            self.model = None  # the old model's memory goes before the new one arrives
            self.model = create_model(spec, device=self.device)
        return self.model

    def decode(self, uri: str, limit: int | None, rows: tuple[int, int], budget):
        # decoded by the first worker that needs the shard (no extra process to start), then
        # shared with the others through the object store
        return load_dataset(uri, progress=False, limit=limit, rows=rows, max_pixels=budget)

    def describe(self, spec: dict, flops_counter: str, zoo_dir: str) -> dict:
        return describe_model(self._load(spec), flops_counter, Path(zoo_dir))

    def run(self, spec: dict, data, out: str, batch_size: int, topk: int, save_logits: bool) -> int:
        res = predict(self._load(spec), data, batch_size, topk, save_logits, progress=False)
        atomic_write_npz(Path(out), ids=np.array(data.ids, dtype=str), labels=data.labels,
                         failed=np.array([i for i, _ in data.failures], dtype=str), **res)
        return os.getpid()


# a worker lost with its process or its node
WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError) if ray else ()


class RayScheduler:
    """The driver's side of one run: a pool of `ModelWorker` actors as large as the cluster
    allows, the units still to run, the decoded shards in the object store, and the lost workers.

    An idle worker takes the next unit of the model it holds; failing that, a model no worker
    holds yet; failing that (the tail), any unit left, so no slot idles while work remains. The
    driver, not Ray, reruns the unit of a lost worker: a restarted actor may never be scheduled
    again once its node is gone, and a task waiting for it would wait for ever.
    """

    def __init__(self, cfg: ProfileConfig, path: Path, manifest: dict, todo: list[tuple[ModelSpec, dict[Unit, Path]]],
                 pending: dict[str, list[Unit]], counts: dict[str, int], *, device: str, gpus_per_task: float,
                 cpus_per_task: float, max_retries: int, bar, log: Callable[[str], None],
                 on_unit: Callable[[Unit, int], None] | None):
        self.cfg, self.path, self.manifest, self.counts = cfg, path, manifest, counts
        self.pending, self.by_key = pending, {spec.key: (spec, files) for spec, files in todo}
        self.gpus, self.cpus, self.max_retries = gpus_per_task, cpus_per_task, max_retries
        self.bar, self.log, self.on_unit, self.budget = bar, log, on_unit, cfg.budget()
        self.decoded: dict[tuple[str, int], Any] = {}
        self.users: dict[tuple[str, int], int] = {}  # units still to run on each decoded shard
        for units in pending.values():
            for u in units:
                self.users[(u.split, u.shard)] = self.users.get((u.split, u.shard), 0) + 1
        self.remaining = {key: len(units) for key, units in pending.items()}
        res = ray.cluster_resources()
        slots = res.get("GPU", 0) / gpus_per_task if gpus_per_task > 0 else res.get("CPU", 1) / cpus_per_task
        self.n_workers = max(1, min(int(slots), sum(self.remaining.values()) or 1))
        self.actor = ray.remote(ModelWorker).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_restarts=0,
                                                     max_task_retries=0)
        self.device = device
        self.workers = {w: self.actor.remote(device) for w in range(self.n_workers)}
        self.holds: dict[int, str | None] = {w: None for w in range(self.n_workers)}
        self.described: dict[str, tuple[Any, int]] = {}
        self.inflight: dict[Any, tuple[Unit, int]] = {}
        self.tries: dict[Unit, int] = {}
        self.reruns, self.next_id = 0, self.n_workers

    def run(self) -> None:
        try:
            for key, n in self.remaining.items():
                if n == 0:  # every unit was staged by an earlier run: only the FLOPs are left
                    self.describe(key, 0)
                    self.merge(key)
            for w in list(self.workers):
                self.submit(w)
            while self.inflight:
                [ref], _ = ray.wait(list(self.inflight), num_returns=1)
                self.finished(ref)
        finally:
            self.bar.close()
            for a in self.workers.values():
                ray.kill(a)
        self.counts["retries"] = self.reruns

    def finished(self, ref) -> None:
        u, w = self.inflight.pop(ref)
        try:
            pid = ray.get(ref)
        except WORKER_GONE:  # the worker died, alone or with its node
            self.lose(w, u)
            return
        except RayError as e:  # the worker is alive, but the shard it read was lost with another
            if isinstance(e, RayTaskError):
                raise  # the unit itself failed (a model error): rerunning would fail again
            self.tries[u] = self.tries.get(u, 0) + 1
            if self.tries[u] > self.max_retries:
                raise ZooError(f"{u.model}: shard {u.shard} of {u.split} was lost {self.tries[u]} times "
                               f"({type(e).__name__}); rerun the same command to resume") from None
            self.requeue(u)
            self.submit(w)
            return
        self.counts["run"] += 1
        self.remaining[u.model] -= 1
        self.release(u)
        self.bar.update(1)
        self.show()
        if self.on_unit:
            self.on_unit(u, pid)
        self.submit(w)  # before the merge, so the worker does not wait for the driver's writes
        if self.remaining[u.model] == 0:
            self.merge(u.model)

    def show(self) -> None:
        self.bar.set_postfix(models=f"{self.counts['merged']}/{len(self.by_key)}", retries=self.reruns)

    def shard_ref(self, u: Unit, worker):
        key = (u.split, u.shard)
        if key not in self.decoded:
            self.decoded[key] = worker.decode.remote(self.cfg.splits[u.split], self.cfg.limit, (u.start, u.stop),
                                                     self.budget)
        return self.decoded[key]

    def release(self, u: Unit) -> None:
        key = (u.split, u.shard)
        self.users[key] -= 1
        if self.users[key] == 0:  # the last model has run on it: the object store may free it
            self.decoded.pop(key, None)

    def requeue(self, u: Unit) -> None:
        self.reruns += 1
        self.pending[u.model].insert(0, u)
        self.decoded.pop((u.split, u.shard), None)  # it may have been lost with a node

    def room(self, wait_s: float) -> bool:
        """Whether the cluster can hold one more worker; a dead worker's share is freed a moment
        after its death is noticed, so this waits up to ``wait_s`` for it."""
        need = ("GPU", self.gpus) if self.gpus > 0 else ("CPU", self.cpus)
        deadline = time.monotonic() + wait_s
        while True:
            if ray.available_resources().get(need[0], 0) >= need[1] - 1e-9:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def lose(self, w: int, u: Unit) -> None:
        """Worker ``w`` failed unit ``u``: requeue the unit, retire the worker, replace it if there is room."""
        self.counts["workers_lost"] += 1
        self.requeue(u)
        for key in [k for k, (_, dw) in self.described.items() if dw == w]:
            self.described.pop(key)  # described again on a live worker
        with contextlib.suppress(RayError):  # it may be gone already, with its node
            ray.kill(self.workers.pop(w))
        self.holds.pop(w)
        if self.counts["workers_lost"] <= self.max_retries * self.n_workers and self.room(wait_s=5.0):
            new, self.next_id = self.next_id, self.next_id + 1
            self.workers[new], self.holds[new] = self.actor.remote(self.device), None
        if not self.workers:
            raise ZooError("every Ray worker was lost and the cluster has no room for another; "
                           "rerun the same command to resume (finished units are kept)")
        busy = {bw for _, bw in self.inflight.values()}
        for idle in [x for x in self.workers if x not in busy]:
            self.submit(idle)

    def describe(self, key: str, w: int) -> None:
        if key not in self.described:  # FLOPs once per model, on the first worker that loads it
            spec = self.by_key[key][0]
            self.described[key] = (self.workers[w].describe.remote(spec.to_dict(), self.cfg.flops_counter,
                                                                   str(self.path)), w)

    def next_unit(self, w: int) -> Unit | None:
        held = {k for k in self.holds.values() if k}
        own = [self.holds[w]] if self.holds[w] else []
        for key in own + [k for k in self.pending if k not in held] + list(self.pending):
            if key and self.pending.get(key):
                return self.pending[key].pop(0)
        return None

    def submit(self, w: int) -> None:
        u = self.next_unit(w)
        if u is None:
            return
        spec, files = self.by_key[u.model]
        self.holds[w] = u.model
        self.describe(u.model, w)
        cfg = self.cfg
        ref = self.workers[w].run.remote(spec.to_dict(), self.shard_ref(u, self.workers[w]), str(files[u]),
                                         cfg.eval_batch_size, cfg.topk, cfg.save_logits)
        self.inflight[ref] = (u, w)

    def merge(self, key: str) -> None:
        files = self.by_key[key][1]
        for attempt in range(self.max_retries + 2):
            try:
                entry = ray.get(self.described[key][0])
                break
            except RayError as e:  # its worker was lost since: describe it again on a live one
                if isinstance(e, RayTaskError) or attempt > self.max_retries or not self.workers:
                    raise
                self.described.pop(key)
                self.describe(key, next(iter(self.workers)))
        _merge(self.path, self.manifest, self.cfg, key, files, entry, self.log)
        self.counts["merged"] += 1
        self.show()


def profile_on_ray(cfg: ProfileConfig, root: Path | None = None, address: str | None = None, shards: int = 4,
                   gpus_per_task: float = 0.0, cpus_per_task: float = 1.0, max_retries: int = MAX_RETRIES,
                   progress: bool = True, log: Callable[[str], None] = print,
                   on_unit: Callable[[Unit, int], None] | None = None) -> dict[str, Any]:
    """Profile ``cfg`` (predictions and FLOPs, no latency) as model × shard units on Ray.

    Joins the cluster at ``address`` (or ``RAY_ADDRESS``) when given, uses a Ray instance this
    process already started, or else starts a local one. ``on_unit(unit, worker_pid)`` is called
    as each unit finishes. Returns counts: ``units`` (all), ``run`` (computed now), ``reused``
    (found staged), ``skipped`` (units of models already in the zoo), ``retries`` (units run again
    after their worker was lost), ``workers_lost`` (with their process or node), ``merged`` (models
    written to the zoo).
    """
    sizes = check_config(cfg, shards, gpus_per_task, cpus_per_task)  # before Ray starts anything
    path = write_path(cfg.zoo, root, log)  # never the bundled zoos: a copy of one, or the write root
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            set_local_ray_env()  # a local instance: its workers at the default priority
        ray.init(address=address, log_to_driver=False)
    if gpus_per_task > ray.cluster_resources().get("GPU", 0):
        raise UsageError(f"--gpus-per-task {gpus_per_task} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPU(s)")
    staging = staging_dir(path)
    bounds = {s: shard_bounds(n, shards, cfg.eval_batch_size) for s, n in sizes.items()}
    counts = {"units": 0, "run": 0, "reused": 0, "skipped": 0, "retries": 0, "workers_lost": 0, "merged": 0}
    with zoo_lock(path):
        manifest = load_manifest(path, cfg)
        if cfg.restart:
            manifest = restart(path, manifest)
        check_resume(path, manifest, cfg)
        todo, pending = [], {}
        for spec in cfg.models:
            units = [Unit(spec.key, s, k, a, b) for s, bs in bounds.items() for k, (a, b) in enumerate(bs)]
            counts["units"] += len(units)
            if not cfg.force and model_done(path, manifest, spec.key, cfg.splits):
                counts["skipped"] += len(units)
                log(f"{spec.key}: already profiled, skipping")
                continue
            tags = {s: _unit_tag(cfg, spec.to_dict(), s) for s in cfg.splits}
            files = {u: unit_file(staging, u, tags[u.split]) for u in units}
            missing = [u for u in units if _staged(files[u]) is None]
            counts["reused"] += len(units) - len(missing)
            todo.append((spec, files))
            pending[spec.key] = missing
        bar = tqdm(total=counts["units"], initial=counts["units"] - sum(map(len, pending.values())),
                   desc=f"profile {cfg.zoo} on ray", disable=not progress)
        RayScheduler(cfg, path, manifest, todo, pending, counts, device="cuda" if gpus_per_task > 0 else cfg.device,
                     gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task, max_retries=max_retries, bar=bar,
                     log=log, on_unit=on_unit).run()
        if staging.is_dir() and not any(staging.rglob("*.npz")):
            shutil.rmtree(staging, ignore_errors=True)
    return counts


def _merge(path: Path, manifest: dict, cfg: ProfileConfig, key: str, files: dict[Unit, Path], entry: dict,
           log: Callable[[str], None]) -> None:
    """Concatenate a model's staged shards into the zoo's prediction files, then add its manifest entry."""
    accuracy = {}
    for split in cfg.splits:
        parts = [_staged(files[u]) for u in sorted((u for u in files if u.split == split), key=lambda u: u.start)]
        if any(p is None for p in parts):
            raise ZooError(f"{key}: a staged shard of split {split!r} no longer reads back; run the command again")
        ids = [str(i) for p in parts for i in p["ids"]]
        labels = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
        failed = [(str(i), "unreadable") for p in parts for i in p["failed"]]
        whole = DecodedSet(cfg.splits[split], ids, labels, [], None, failed)
        names = manifest["splits"].get(split, {}).get("class_names")
        if names is None:  # the split's class names come from the data, as a local run records them
            names = load_dataset(cfg.splits[split], progress=False, limit=cfg.limit, rows=(0, 1)).class_names
        whole.class_names = stored_class_names(names)
        register_split(path, manifest, split, cfg.splits[split], whole)
        res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("ids", "labels", "failed")}
        out = path / "preds" / model_dirname(key) / f"{split}.npz"
        if existing_preds(out, whole.fingerprint) is None or cfg.force:
            atomic_write_npz(out, fingerprint=np.array(whole.fingerprint), **res)
        accuracy[split] = top1(res["pred"], labels)
    manifest["models"][key] = {**entry, "profiled_on": "ray", "accuracy": accuracy}
    atomic_write_yaml(path / MANIFEST, manifest)
    for f in files.values():
        f.unlink(missing_ok=True)
    log(f"{key}: {entry['macs'] / 1e9:.3f} GMACs, " + ", ".join(
        f"{s} top-1 {100 * a:.2f}%" for s, a in accuracy.items() if a is not None) + " (ray)")


__all__ = ["Unit", "ModelWorker", "RayScheduler", "profile_on_ray", "shard_bounds", "staging_dir", "check_config"]
