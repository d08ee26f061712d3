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

from .errors import UsageError
from .profiler import ProfileConfig, check_resume, restart, _existing_preds, _load_manifest, _model_done, _register_split, describe_model, \
    predict, top1
from .zoo import (MANIFEST, ZooError, atomic_write_npz, atomic_write_yaml, model_dirname, stored_class_names, zoo_lock,
                  zoo_path)

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
        with np.load(f) as z:
            out = {k: z[k] for k in z.files}
        return out if {"ids", "labels", "pred", "conf"} <= set(out) else None
    except Exception:  # a leftover that does not read back is computed again
        return None


def check_config(cfg: ProfileConfig, shards: int, gpus_per_task: float, cpus_per_task: float) -> dict[str, int]:
    """Everything that can be checked before a task starts: names, checkpoints, data, options.
    Returns the number of rows of each split."""
    from .data import dataset_size
    from .models import resolve_kind

    import importlib.util

    if importlib.util.find_spec("ray") is None:
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


def _ray_classes():
    import ray

    @ray.remote
    class ModelWorker:
        """Runs units, keeping the model it last loaded: a model loads once per worker, and the
        worker process (with torch imported) serves model after model."""

        def __init__(self, device: str):
            self.device, self.model = device, None

        def _load(self, spec: dict):
            from .models import ModelSpec, create_model

            spec = ModelSpec.from_dict(spec)
            if self.model is None or self.model.key != spec.key:
                self.model = None  # the old model's memory goes before the new one arrives
                self.model = create_model(spec, device=self.device)
            return self.model

        def decode(self, uri: str, limit: int | None, rows: tuple[int, int], budget):
            # decoded by the first worker that needs the shard (no extra process to start), then
            # shared with the others through the object store
            from .data import load_dataset

            return load_dataset(uri, progress=False, limit=limit, rows=rows, max_pixels=budget)

        def describe(self, spec: dict, flops_counter: str, zoo_dir: str) -> dict:
            return describe_model(self._load(spec), flops_counter, Path(zoo_dir))

        def run(self, spec: dict, data, out: str, batch_size: int, topk: int, save_logits: bool) -> int:
            res = predict(self._load(spec), data, batch_size, topk, save_logits, progress=False)
            atomic_write_npz(Path(out), ids=np.array(data.ids, dtype=str), labels=data.labels,
                             failed=np.array([i for i, _ in data.failures], dtype=str), **res)
            return os.getpid()

    return ModelWorker


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
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError, RayTaskError
    from tqdm.auto import tqdm

    sizes = check_config(cfg, shards, gpus_per_task, cpus_per_task)  # before Ray starts anything
    budget = cfg.budget()
    path = zoo_path(cfg.zoo, root) if root is None else Path(root) / cfg.zoo
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            from .ray_local import set_local_ray_env

            set_local_ray_env()  # a local instance: its workers at the default priority
        ray.init(address=address, log_to_driver=False)
    if gpus_per_task > ray.cluster_resources().get("GPU", 0):
        raise UsageError(f"--gpus-per-task {gpus_per_task} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPU(s)")
    ModelWorker = _ray_classes()
    device = "cuda" if gpus_per_task > 0 else cfg.device
    staging = staging_dir(path)
    bounds = {s: shard_bounds(n, shards, cfg.eval_batch_size) for s, n in sizes.items()}
    counts = {"units": 0, "run": 0, "reused": 0, "skipped": 0, "retries": 0, "workers_lost": 0, "merged": 0}
    with zoo_lock(path):
        manifest = _load_manifest(path, cfg)
        if cfg.restart:
            manifest = restart(path, manifest)
        check_resume(path, manifest, cfg)
        todo, pending = [], {}
        for spec in cfg.models:
            units = [Unit(spec.key, s, k, a, b) for s, bs in bounds.items() for k, (a, b) in enumerate(bs)]
            counts["units"] += len(units)
            if not cfg.force and _model_done(path, manifest, spec.key, cfg.splits):
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
        decoded: dict[tuple[str, int], Any] = {}
        users: dict[tuple[str, int], int] = {}  # units still to run on each decoded shard
        for units in pending.values():
            for u in units:
                users[(u.split, u.shard)] = users.get((u.split, u.shard), 0) + 1

        def shard_ref(u: Unit, worker):
            key = (u.split, u.shard)
            if key not in decoded:
                decoded[key] = worker.decode.remote(cfg.splits[u.split], cfg.limit, (u.start, u.stop), budget)
            return decoded[key]

        def release(u: Unit) -> None:
            key = (u.split, u.shard)
            users[key] -= 1
            if users[key] == 0:  # the last model has run on it: the object store may free it
                decoded.pop(key, None)

        # A pool of workers as large as the cluster allows. An idle worker takes the next unit of
        # the model it holds; failing that, a model no worker holds yet; failing that (the tail),
        # any unit left, so no slot idles while work remains.
        res = ray.cluster_resources()
        slots = res.get("GPU", 0) / gpus_per_task if gpus_per_task > 0 else res.get("CPU", 1) / cpus_per_task
        remaining = {spec.key: len(pending[spec.key]) for spec, _ in todo}
        n_workers = max(1, min(int(slots), sum(remaining.values()) or 1))
        # The driver, not Ray, reruns the unit of a lost worker: a restarted actor may never be
        # scheduled again once its node is gone, and a task waiting for it would wait for ever.
        opts = dict(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_restarts=0, max_task_retries=0)
        WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
        workers = {w: ModelWorker.options(**opts).remote(device) for w in range(n_workers)}
        by_key = {spec.key: (spec, files) for spec, files in todo}
        holds: dict[int, str | None] = {w: None for w in range(n_workers)}
        described, inflight = {}, {}
        rerun, next_id, tries = [0], [n_workers], {}

        def room(wait_s: float) -> bool:
            """Whether the cluster can hold one more worker; a dead worker's share is freed a moment
            after its death is noticed, so this waits up to ``wait_s`` for it."""
            need = ("GPU", gpus_per_task) if gpus_per_task > 0 else ("CPU", cpus_per_task)
            deadline = time.monotonic() + wait_s
            while True:
                if ray.available_resources().get(need[0], 0) >= need[1] - 1e-9:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)

        def lose(w: int, u: Unit) -> None:
            """Worker ``w`` failed unit ``u``: requeue the unit, retire the worker, replace it if there is room."""
            rerun[0] += 1
            counts["workers_lost"] += 1
            pending[u.model].insert(0, u)
            decoded.pop((u.split, u.shard), None)  # it may have been lost with the worker's node
            for key in [k for k, (_, dw) in described.items() if dw == w]:
                described.pop(key)  # described again on a live worker
            with contextlib.suppress(RayError):  # it may be gone already, with its node
                ray.kill(workers.pop(w))
            holds.pop(w)
            if counts["workers_lost"] <= max_retries * n_workers and room(wait_s=5.0):
                new, next_id[0] = next_id[0], next_id[0] + 1
                workers[new], holds[new] = ModelWorker.options(**opts).remote(device), None
            if not workers:
                raise ZooError("every Ray worker was lost and the cluster has no room for another; "
                               "rerun the same command to resume (finished units are kept)")
            busy = {bw for _, bw in inflight.values()}
            for idle in [x for x in workers if x not in busy]:
                submit(idle)

        def describe(key: str, w: int) -> None:
            if key not in described:  # FLOPs once per model, on the first worker that loads it
                described[key] = (workers[w].describe.remote(by_key[key][0].to_dict(), cfg.flops_counter, str(path)), w)

        def next_unit(w: int) -> Unit | None:
            held = {k for k in holds.values() if k}
            order = ([holds[w]] if holds[w] else []) + [k for k in pending if k not in held] + list(pending)
            for key in order:
                if key and pending.get(key):
                    return pending[key].pop(0)
            return None

        def submit(w: int) -> None:
            u = next_unit(w)
            if u is None:
                return
            spec, files = by_key[u.model]
            holds[w] = u.model
            describe(u.model, w)
            ref = workers[w].run.remote(spec.to_dict(), shard_ref(u, workers[w]), str(files[u]), cfg.eval_batch_size,
                                        cfg.topk, cfg.save_logits)
            inflight[ref] = (u, w)

        def merge(key: str) -> None:
            spec, files = by_key[key]
            for attempt in range(max_retries + 2):
                try:
                    entry = ray.get(described[key][0])
                    break
                except RayError as e:  # its worker was lost since: describe it again on a live one
                    if isinstance(e, RayTaskError) or attempt > max_retries or not workers:
                        raise
                    described.pop(key)
                    describe(key, next(iter(workers)))
            _merge(path, manifest, cfg, key, files, entry, log)
            counts["merged"] += 1
            bar.set_postfix(models=f"{counts['merged']}/{len(todo)}", retries=rerun[0])

        try:
            for key, n in remaining.items():
                if n == 0:  # every unit was staged by an earlier run: only the FLOPs are left
                    describe(key, 0)
                    merge(key)
            for w in list(workers):
                submit(w)
            while inflight:
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                u, w = inflight.pop(ref)
                try:
                    pid = ray.get(ref)
                except WORKER_GONE:  # the worker died, alone or with its node
                    lose(w, u)
                    continue
                except RayError as e:  # the worker is alive, but the shard it read was lost with another
                    if isinstance(e, RayTaskError):
                        raise  # the unit itself failed (a model error): rerunning would fail again
                    tries[u] = tries.get(u, 0) + 1
                    if tries[u] > max_retries:
                        raise ZooError(f"{u.model}: shard {u.shard} of {u.split} was lost {tries[u]} times "
                                       f"({type(e).__name__}); rerun the same command to resume") from None
                    pending[u.model].insert(0, u)
                    decoded.pop((u.split, u.shard), None)
                    rerun[0] += 1
                    submit(w)
                    continue
                counts["run"] += 1
                remaining[u.model] -= 1
                release(u)
                bar.update(1)
                bar.set_postfix(models=f"{counts['merged']}/{len(todo)}", retries=rerun[0])
                if on_unit:
                    on_unit(u, pid)
                submit(w)  # before the merge, so the worker does not wait for the driver's writes
                if remaining[u.model] == 0:
                    merge(u.model)
        finally:
            bar.close()
            for a in workers.values():
                ray.kill(a)
        counts["retries"] = rerun[0]
        if staging.is_dir() and not any(staging.rglob("*.npz")):
            shutil.rmtree(staging, ignore_errors=True)
    return counts


def _merge(path: Path, manifest: dict, cfg: ProfileConfig, key: str, files: dict[Unit, Path], entry: dict,
           log: Callable[[str], None]) -> None:
    """Concatenate a model's staged shards into the zoo's prediction files, then add its manifest entry."""
    from .data import DecodedSet

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
            from .data import load_dataset

            names = load_dataset(cfg.splits[split], progress=False, limit=cfg.limit, rows=(0, 1)).class_names
        whole.class_names = stored_class_names(names)
        _register_split(path, manifest, split, cfg.splits[split], whole)
        res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("ids", "labels", "failed")}
        out = path / "preds" / model_dirname(key) / f"{split}.npz"
        if _existing_preds(out, whole.fingerprint) is None or cfg.force:
            atomic_write_npz(out, fingerprint=np.array(whole.fingerprint), **res)
        accuracy[split] = top1(res["pred"], labels)
    manifest["models"][key] = {**entry, "profiled_on": "ray", "accuracy": accuracy}
    atomic_write_yaml(path / MANIFEST, manifest)
    for f in files.values():
        f.unlink(missing_ok=True)
    log(f"{key}: {entry['macs'] / 1e9:.3f} GMACs, " + ", ".join(
        f"{s} top-1 {100 * a:.2f}%" for s, a in accuracy.items() if a is not None) + " (ray)")


__all__ = ["Unit", "profile_on_ray", "shard_bounds", "staging_dir", "check_config"]
