"""Run a saver → … → base cascade for real, with batch shrinking, returning results in input order.

Each stage derives its own input from the once-decoded uint8 image (its own resize, crop and
normalisation). A sample leaves the cascade at the first saver whose max-softmax confidence is
≥ that saver's threshold; only the samples still open are batched into the next stage, so the
compute of later stages is really skipped. Survivors are held until they fill a batch (refill), so
a base behind a good saver still runs at the batch size it was given.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import engine
from .backends import DEFAULT_BACKEND, backends_that, get_backend
from .decoding import decoded_blocks, take_images
from .errors import CascadeError  # noqa: F401 (re-exported)
from .models import LoadedModel
from .policy import Selection, answers, apply, exit_ratios
from .runtimes import runner_with_fallback
from .stageplan import StagePlan, check_class_spaces, resolve, stage_values


@dataclass
class CascadeResult:
    """Per-sample answers in input order. ``stage`` indexes ``stage_names``.

    With ``all_stages=True``, ``stage_pred``/``stage_conf`` are (num_stages, N) arrays holding every
    stage's prediction on every sample (computed without shrinking, for analysis).
    """

    pred: np.ndarray
    conf: np.ndarray
    stage: np.ndarray
    stage_names: list[str]
    class_names: list[str] | None = None
    stage_pred: np.ndarray | None = None
    stage_conf: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def exit_ratios(self) -> list[float]:
        return exit_ratios(self.stage, len(self.stage_names))

    def class_name(self, i: int) -> str | None:
        if self.class_names is None:
            return None
        return self.class_names[int(self.pred[i])]

    def rows(self) -> list[dict[str, Any]]:
        return [{"class": int(self.pred[i]), "name": self.class_name(i), "confidence": float(self.conf[i]),
                 "exit_stage": int(self.stage[i]), "stage_name": self.stage_names[int(self.stage[i])]}
                for i in range(len(self))]


@dataclass
class Cascade:
    """Stages in running order: savers first, the base last. ``thresholds[i]`` belongs to saver i.

    Build one from a `StagePlan` with `from_plan` (as
    `build_cascade` does), or from models already loaded, whose options are then checked by
    the same rules a plan obeys. ``plan`` holds what the cascade runs, resolved and checked.
    """

    stages: list[LoadedModel]
    thresholds: list[float]
    class_names: list[str] | None = None
    device: str | torch.device = "cpu"
    half: bool = False
    channels_last: bool = False
    backend: str | Sequence[str] = DEFAULT_BACKEND  # one for every stage, or one per stage (see tinysaver.backends)
    backend_fallback: str | None = None     # DEFAULT_BACKEND: a stage whose export fails runs on it instead
    cache_dir: str | Path | None = None     # where exports are cached (default: next to the checkpoint)
    threads: int | Sequence[int] | None = None  # intra-op threads of stages with their own pool, one or per stage
    spin: bool | Sequence[bool] = False  # onnxruntime stages: idle threads spin (the runtime's default), one or per stage
    temperatures: Sequence[float] | None = None  # one per stage: confidence = max softmax(logits / T); default 1
    plan: StagePlan | None = None  # given: the options above are read from it, already checked
    _runners: list = field(default_factory=list, repr=False, init=False)
    _stages: list = field(default_factory=list, repr=False, init=False)  # engine.ModelStage per model

    def __post_init__(self) -> None:
        if not self.stages:
            raise CascadeError("a cascade needs at least the base model")
        keys = tuple(m.key for m in self.stages)
        check_class_spaces({m.key: m.num_classes for m in self.stages})
        if self.plan is None:
            n = len(self.stages)
            self.plan = StagePlan(
                "", keys, keys, tuple(self.thresholds),
                tuple(float(t) for t in (self.temperatures if self.temperatures is not None else [1.0] * n)),
                stage_values(self.backend, n, "backend", (str,)), stage_values(self.threads, n, "threads", (int, type(None))),
                stage_values(self.spin, n, "spin", (bool,)), str(torch.device(self.device)), self.half,
                self.channels_last, self.backend_fallback,
                class_names=tuple(self.class_names) if self.class_names else None)
        elif self.plan.keys != keys:
            raise CascadeError(f"the plan runs {list(self.plan.keys)}, the models given are {list(keys)}")
        p = self.plan
        self.thresholds, self.temperatures = list(p.thresholds), list(p.temperatures)
        self.device, self.half, self.channels_last = p.device, p.half, p.channels_last
        self.class_names = list(p.class_names) if p.class_names else None

        for m in self.stages:
            m.module.eval().to(self.device)
            if self.half:
                m.module.half()
            if self.channels_last:
                m.module.to(memory_format=torch.channels_last)
        cache = Path(self.cache_dir) if self.cache_dir else None
        self._runners = [runner_with_fallback(m, b, p.backend_fallback, cache, t, v)
                         for m, b, t, v in zip(self.stages, p.backends, p.threads, p.spins)]
        self._stages = [engine.ModelStage(m, r, temp, self.device, self.half, self.channels_last)
                        for m, r, temp in zip(self.stages, self._runners, self.temperatures)]

    @classmethod
    def from_plan(cls, plan: StagePlan, *, zoo=None, cache_dir: str | Path | None = None) -> "Cascade":
        """The cascade of ``plan``: each model rebuilt by the plan's zoo on the plan's device (the
        zoo stops when timm's current preprocessing differs from the recorded one, unless the plan
        accepts the change). ``zoo``: that zoo, already loaded by whoever resolved the plan (a plan
        holds only its folder, so that it travels to Serve replicas); default: loaded from there."""
        from .zoo import load_zoo

        if zoo is None or Path(zoo.path).resolve() != Path(plan.zoo_dir).resolve():
            zoo = load_zoo(plan.zoo_dir)
        stages = [zoo.load_model(k, device=plan.device, accept_preprocess_change=plan.accept_preprocess_change)
                  for k in plan.keys]
        return cls(stages, list(plan.thresholds), plan=plan, cache_dir=cache_dir)

    @property
    def backends(self) -> list[str]:
        """The backend each stage actually runs on (after any fallback)."""
        return [r.backend for r in self._runners]

    @property
    def stage_names(self) -> list[str]:
        return [m.key for m in self.stages]

    def _run_stage(self, i: int, images: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, conf, _ = self._stages[i](images, None)
        return pred, conf

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor] | torch.Tensor, batch_size: int | None = None, shrink: bool = True,
                all_stages: bool = False, refill: bool = True, pipeline: bool = False) -> CascadeResult:
        """Classify decoded uint8 images, a list of (C, H, W) or one (N, C, H, W) tensor, in model
        batches of ``batch_size`` (default: the plan's).

        With ``shrink`` (the default) a stage only sees the samples no earlier saver answered.
        ``refill`` then holds those survivors until ``batch_size`` of them have gathered, so later
        stages run full batches rather than each input chunk's few leftovers; only each stage's
        last batch may be short. ``refill=False`` sends every chunk's survivors on at once.
        ``shrink=False`` runs every stage on every sample and applies the thresholds afterwards
        (the reference the shrinking paths must match). ``all_stages`` implies ``shrink=False``.
        ``pipeline`` runs each later stage in its own thread, fed by the stage before it, so the
        saver works on the next batch while the base works on survivors: more images per second
        when the cores are not all busy with one stage (at batch 1 give each stage fewer
        ``threads``), at the cost of each survivor waiting for the base's queue. The batches, and
        so the answers, are the ones the sequential path gives.
        The answers are in input order whichever path runs.
        """
        n = len(images)
        if n == 0:
            raise CascadeError("no images to classify: the input is empty")
        batch_size = self.plan.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CascadeError(f"batch_size must be ≥ 1, got {batch_size}")
        shrink = shrink and not all_stages
        if pipeline and not shrink:
            raise CascadeError("pipeline needs the shrinking path; it cannot be combined with shrink=False "
                               "or all_stages=True")
        if pipeline and len(self.stages) > 1 and torch.get_num_threads() > 1 and \
                any(get_backend(b).torch_modules for b in self.backends):
            warnings.warn(f"pipeline=True runs {'/'.join(backends_that(torch_modules=True))} stages in threads that share torch's "
                          f"{torch.get_num_threads()}-thread pool, which oversubscribes the cores: measured on 2 "
                          "cores at batch 1, the pipelined cascade ran half as fast as the sequential one. "
                          "Give --threads 1 (in Python: torch.set_num_threads(1)) first, or run the stages "
                          f"on {'/'.join(backends_that(torch_modules=False))} with per-stage threads", stacklevel=2)
        # Full batches will run, so a fixed-shape backend compiles for their size (once). A call shorter than
        # one batch is not worth a compile: its odd size stays on the dynamic-batch model.
        if n >= batch_size:
            for r in self._runners:
                r.expect_batch(batch_size)
        S = len(self.stages)
        if not shrink:  # every sample through every stage, then the policy decides
            sp = np.empty((S, n), dtype=np.int64)
            sc = np.empty((S, n), dtype=np.float32)
            for s in range(0, n, batch_size):
                idx = np.arange(s, min(s + batch_size, n))
                for i in range(S):
                    sp[i, idx], sc[i, idx] = (t.numpy() for t in self._run_stage(i, take_images(images, idx)))
            stage = apply(sc, self.thresholds)
            return CascadeResult(answers(sp, stage), answers(sc, stage), stage, self.stage_names, self.class_names,
                                 sp, sc)
        pred = np.empty(n, dtype=np.int64)
        conf = np.empty(n, dtype=np.float32)
        stage = np.empty(n, dtype=np.int64)

        def answer(i: int, idx: np.ndarray, p: np.ndarray, c: np.ndarray) -> None:
            pred[idx], conf[idx], stage[idx] = p, c, i

        engine.run(self._stages, self.thresholds, n, lambda idx: take_images(images, idx), answer,
                   batch_size=batch_size, refill=refill, pipeline=pipeline)
        return CascadeResult(pred, conf, stage, self.stage_names, self.class_names)


def build_cascade(selection: Selection | dict | str | Path, zoo=None, device: str = "cpu",
                  accept_preprocess_change: bool = False, cache_dir: str | Path | None = None,
                  **options: Any) -> Cascade:
    """A Cascade from a `tinysaver.policy.Selection` (or its dict form, or a JSON file) and its zoo.

    ``options`` are `tinysaver.stageplan.resolve`'s (backend, threads, spin, half, ...): the
    selection, every model and every option are checked there, once, before any model loads.
    """
    return Cascade.from_plan(resolve(selection, zoo, device=device, accept_preprocess_change=accept_preprocess_change,
                                     **options), zoo=zoo, cache_dir=cache_dir)


def measure_throughput(cascade: Cascade, images, batch_size: int, repeats: int = 2,
                       **predict_kwargs: Any) -> tuple[float, CascadeResult]:
    """Best-of-``repeats`` wall time (s) to classify ``images`` (decoded uint8) after one warm-up batch.

    ``predict_kwargs`` go to `Cascade.predict` (e.g. ``refill=False``).
    """
    cascade.predict(images[: min(len(images), batch_size)], batch_size=batch_size, **predict_kwargs)
    best, res = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = cascade.predict(images, batch_size=batch_size, **predict_kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, res


def compare_with_base(cascade: Cascade, images, labels, batch_sizes=(1, 32, 128), repeats: int = 2) -> list[dict]:
    """Throughput of base alone, saver alone and the cascade on the same images, plus the ideal.

    The ideal time per image is t(saver) + (1 − exit ratio) · t(base), from the stages timed alone.
    ``cascade_norefill_img_s`` is the cascade with ``refill=False`` (survivors sent on per input
    chunk), the baseline refill is measured against. Only two-stage cascades are compared.
    """
    if len(cascade.stages) != 2:
        raise CascadeError("compare_with_base takes a saver → base cascade")
    same = dict(device=cascade.device, cache_dir=cascade.cache_dir)
    threads = list(cascade.plan.threads)
    saver_only = Cascade(cascade.stages[:1], [], backend=cascade.backends[:1], threads=threads[:1], **same)
    base_only = Cascade(cascade.stages[1:], [], backend=cascade.backends[1:], threads=threads[1:], **same)
    rows = []
    n = len(images)
    for bs in batch_sizes:
        tb, rb = measure_throughput(base_only, images, bs, repeats)
        ts, _ = measure_throughput(saver_only, images, bs, repeats)
        tc, rc = measure_throughput(cascade, images, bs, repeats)
        tn, _ = measure_throughput(cascade, images, bs, repeats, refill=False)
        exit_ratio = float((rc.stage == 0).mean())
        ideal = ts + (1 - exit_ratio) * tb
        rows.append({"batch": bs, "base_img_s": n / tb, "cascade_img_s": n / tc,
                     "cascade_norefill_img_s": n / tn, "speedup": tb / tc,
                     "ideal_speedup": tb / ideal, "of_ideal": ideal / tc, "exit_ratio": exit_ratio,
                     "base_acc": float((rb.pred == labels).mean()), "cascade_acc": float((rc.pred == labels).mean())})
    return rows


@dataclass
class FileTally:
    """What `classify_files` has done so far: answers per stage, unreadable files, and the time."""

    stage_names: list[str]
    counts: list[int] = field(default_factory=list)
    unreadable: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.counts = self.counts or [0] * len(self.stage_names)

    @property
    def answered(self) -> int:
        return sum(self.counts)

    def summary(self) -> dict:
        """``images``, ``unreadable``, ``seconds``, ``images_per_s`` and each stage's ``exit_ratio``."""
        dt = time.perf_counter() - self.started
        return {"images": self.answered, "unreadable": self.unreadable, "seconds": round(dt, 3),
                "images_per_s": round(self.answered / dt, 2) if dt > 0 else None,
                "exit_ratio": {n: round(c / max(self.answered, 1), 4) for n, c in zip(self.stage_names, self.counts)}}


def classify_files(cascade: Cascade, source, budget, batch_size: int, *, refill: bool = True,
                   pipeline: bool = False, tally: FileTally | None = None):
    """Stream the files of ``source`` (a `tinysaver.decoding.RawSource`, e.g. from
    `tinysaver.sources.paths_source`) through ``cascade``: yields ``(path, row)`` for each image
    answered (``row`` as `CascadeResult.rows` gives it) and ``(path, reason)`` for each file that
    could not be read (one bad file never stops the run), in blocks. ``budget``: the
    `tinysaver.budget.InputBudget` that refuses an image from its header. ``tally`` is updated as
    it goes. Memory stays bounded by the block, which holds a few batches and at least 256 images,
    so that refill can gather survivors across batches and a pipeline is not drained every few."""
    tally = tally if tally is not None else FileTally(cascade.stage_names)
    for index, imgs, failures in decoded_blocks(source, max(batch_size * 8, 256), budget):
        tally.unreadable += len(failures)
        yield from failures
        if not imgs:
            continue
        for path, row in zip((source.ids[i] for i in index), cascade.predict(imgs, refill=refill,
                                                                             pipeline=pipeline).rows()):
            tally.counts[row["exit_stage"]] += 1
            yield path, row


__all__ = ["CascadeResult", "Cascade", "build_cascade", "measure_throughput", "compare_with_base",
           "FileTally", "classify_files"]
