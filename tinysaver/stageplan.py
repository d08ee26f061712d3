"""A selection resolved once into the stages that will run: `StagePlan` and `resolve`.

Everything a runner of a policy needs is decided here, at the boundary, before any model loads:
the zoo models in running order, one threshold per stage but the last, one temperature and one
backend (with its thread count and spin) per stage, the device, the batch size, the class names
and each model's recorded preprocessing (the input budget's resize check). ``Cascade``, every Serve
replica and ESN inference take a ``StagePlan`` and check none of it again.

The rules a plan obeys are written once, in ``StagePlan.__post_init__`` and `check_run_options`:
building a plan by hand (a Cascade of models already loaded, an ESN's parts) goes through the same
checks as `resolve`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .backends import DEFAULT_BACKEND, backends_that, check_backend
from .engine import per_stage
from .errors import CascadeError
from .policy import Selection

DEFAULT_BATCH_SIZE = 32  # images per model batch, for `infer` and Cascade.predict alike


@dataclass(frozen=True)
class StagePlan:
    """The stages of one policy, in running order, with everything each needs to run.

    ``keys``: the zoo models the stages load (an ESN's later stages all load its base); ``names``:
    what answers and metrics call each stage; ``thresholds``: a max-softmax confidence in [0, 1]
    per stage but the last (``inf``: that stage never answers); ``temperatures``: > 0 per stage;
    ``backends``/``threads``/``spins``: per stage, checked against each backend's capabilities;
    ``base_from``: where the base's own chain starts (an audit runs it for the base's answer);
    ``preprocess``: each distinct model's recorded preprocessing, for the input budget.
    """

    zoo_dir: str
    keys: tuple[str, ...]
    names: tuple[str, ...]
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]
    backends: tuple[str, ...]
    threads: tuple[int | None, ...]
    spins: tuple[bool, ...]
    device: str = "cpu"
    half: bool = False
    channels_last: bool = False
    backend_fallback: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    class_names: tuple[str, ...] | None = None
    preprocess: tuple = ()
    accept_preprocess_change: bool = False
    base_from: int | None = None  # None: the last stage alone is the base

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise CascadeError("a cascade needs at least the base model")
        if len(self.keys) != n:
            raise CascadeError(f"{n} stage names need as many models, got {len(self.keys)}")
        if len(self.thresholds) != n - 1:
            raise CascadeError(f"{n - 1} saver(s) need as many thresholds, got {len(self.thresholds)}")
        for t in self.thresholds:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or \
                    not (0.0 <= float(t) <= 1.0 or math.isinf(t) and t > 0):
                raise CascadeError(f"thresholds are max-softmax confidences and must lie in [0, 1] (or inf: never "
                                   f"exit), got {t}")
        if len(self.temperatures) != n or not all(math.isfinite(t) and t > 0 for t in self.temperatures):
            raise CascadeError(f"give one temperature > 0 per stage ({n}), got {list(self.temperatures)}")
        if len(set(self.names)) != n:
            raise CascadeError(f"a model cannot be its own saver: the stages are {list(self.names)}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise CascadeError(f"batch_size must be an integer ≥ 1, got {self.batch_size!r}")
        if self.base_from is None:
            object.__setattr__(self, "base_from", n - 1)
        if not 0 <= self.base_from < n:
            raise CascadeError(f"base_from must index a stage, got {self.base_from} of {n}")
        check_run_options(self.backends, self.threads, self.spins, self.device, self.half, self.channels_last)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def base(self) -> str:
        return self.keys[-1]


def check_run_options(backends: Sequence[str], threads: Sequence[int | None], spins: Sequence[bool],
                      device: str = "cpu", half: bool = False, channels_last: bool = False) -> None:
    """Raise one line when a stage asks its backend for what it cannot do (see
    `tinysaver.backends.Backend`): unknown or not installed, another device, half precision
    or channels-last off torch, its own thread count on torch's shared pool, spin where it has none."""
    import torch

    from .models import check_device

    n = len(backends)
    if len(threads) != n or len(spins) != n:
        raise CascadeError(f"give threads and spin per stage ({n}), got {len(threads)} and {len(spins)}")
    caps = [check_backend(b) for b in backends]
    kind = check_device(device).type  # a device this machine lacks fails here, before any model loads
    if half and kind != "cuda":
        raise CascadeError("half precision is only supported on GPU; keep fp32 on CPU")
    if (half or channels_last) and not all(c.torch_modules for c in caps):
        raise CascadeError(f"half and channels_last apply to the {' and '.join(backends_that(torch_modules=True))} "
                           "backends only")
    off = [c for c in caps if kind not in c.devices]
    if off:
        raise CascadeError(f"the {'/'.join(dict.fromkeys(c.name for c in off))} backend runs on "
                           f"{'/'.join(off[0].devices)} here, not {kind}; use --device cpu")
    # Tiny models at batch 1 run faster on one thread (thread hand-off costs more than the work)
    # while their base may want all cores, so a runtime's thread count is per stage. Backends that
    # run torch modules share torch's one global pool, which a stage cannot set for itself.
    for t, c in zip(threads, caps):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise CascadeError(f"thread counts must be integers ≥ 1, got {t!r}")
        if not c.own_threads and t != torch.get_num_threads():
            raise CascadeError(f"a {c.name} stage runs on torch's {torch.get_num_threads()} thread(s); per-stage "
                               f"thread counts apply to {' and '.join(backends_that(torch_modules=False))} stages (set "
                               "torch's with torch.set_num_threads)")
    if not all(isinstance(v, bool) for v in spins):
        raise CascadeError(f"give spin as one bool for all stages or one per stage ({n}), got {list(spins)!r}")
    if any(v and not c.spins for v, c in zip(spins, caps)):
        raise CascadeError(f"spin applies to {', '.join(backends_that(spins=True))} stages only; the stages run on "
                           f"{','.join(backends)}")


def check_class_spaces(num_classes: dict[str, int | None]) -> None:
    """Every stage predicts the same classes (``num_classes``: model → its class count, None unknown)."""
    known = {k: v for k, v in num_classes.items() if v is not None}
    if len(set(known.values())) > 1:
        raise CascadeError(f"stages predict different class spaces: {known}")


def stage_values(value, n: int, what: str, scalar: tuple[type, ...]) -> tuple:
    """One value for all ``n`` stages or one per stage, as a tuple (the plan's form)."""
    return tuple(per_stage(value, n, what, scalar, CascadeError))


def resolve(selection: Selection | dict | str | Path, zoo=None, *, backend: str | Sequence[str] = DEFAULT_BACKEND,
            threads: int | Sequence[int | None] | None = None, spin: bool | Sequence[bool] = False,
            device: str = "cpu", half: bool = False, channels_last: bool = False,
            backend_fallback: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            accept_preprocess_change: bool = False, root: Path | None = None) -> StagePlan:
    """The plan of a saver → … → base ``selection`` (a Selection, its dict or a JSON file) over
    ``zoo`` (default: the selection's own, under ``root``): the selection checked, every model
    looked up, and each per-stage option (one value for all stages, or one per stage) checked
    against its backend, once. Nothing loads."""
    from .zoo import load_zoo

    selection = Selection.coerce(selection, "resolve")
    zoo = zoo or load_zoo(selection.zoo, root)
    entries = [zoo.entry(m) for m in selection.models]  # unknown names fail here, before anything loads
    for m in selection.models:
        zoo.model_spec(m)  # so does a model the zoo cannot build (published facts, imported predictions)
    check_class_spaces({e.key: e.num_classes for e in entries})
    n = len(entries)
    if backend_fallback is not None and backend_fallback != DEFAULT_BACKEND:
        raise CascadeError(f"a stage whose export fails can fall back to {DEFAULT_BACKEND} only, got {backend_fallback!r}")
    names = zoo.class_names
    keys = tuple(selection.models)
    return StagePlan(
        str(zoo.path), keys, keys, tuple(float(t) for t in selection.thresholds),
        tuple(float(t) for t in (selection.temperatures or [1.0] * n)),
        stage_values(backend, n, "backend", (str,)), stage_values(threads, n, "threads", (int, type(None))),
        stage_values(spin, n, "spin", (bool,)), str(device), half, channels_last, backend_fallback, batch_size,
        tuple(names) if names else None, zoo.preprocesses(keys), accept_preprocess_change)


__all__ = ["DEFAULT_BATCH_SIZE", "StagePlan", "check_class_spaces", "check_run_options", "resolve", "stage_values"]
