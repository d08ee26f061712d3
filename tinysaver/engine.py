"""The one inference engine: any list of stages, with batch shrinking, refill and pipelining.

A **stage** is a callable ``stage(images, carry) -> (pred, conf, carry)`` on one batch:

- ``images``: the decoded uint8 images of the batch's samples (a list of (C, H, W) tensors or one
  (B, C, H, W) tensor), or None for a stage whose ``needs_images`` is False;
- ``carry``: what the previous stage handed on for these samples (None for the first stage, and
  for a plain saver → base cascade): a tensor, or a dict, list or tuple of tensors, batch first;
- returns (B,) classes, (B,) confidences (``tinysaver.policy.confidence``) and the carry for the
  next stage, batch first (None if it has nothing to hand on).

``run`` sends every sample to stage 0, and the samples a stage does not answer
(``tinysaver.policy.exits``) to the next; only those are batched there, so later stages really do
less work. ``Cascade`` (saver → base), ESN dynamic inference (saver → base parts with exits) and
every Serve replica run their stages through ``run``; nothing else walks the stages.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .errors import UsageError
from .policy import confidence, exits


class BatchStage(Protocol):
    name: str

    def __call__(self, images, carry) -> tuple[Any, Any, Any]: ...


def per_stage(value, n: int, what: str, scalar: tuple[type, ...] = (int, float, str, bool, type(None)),
              error: type[Exception] = UsageError) -> list:
    """``value`` for each of ``n`` stages: one value for all, or a sequence of exactly ``n``."""
    if isinstance(value, scalar):
        return [value] * n
    out = list(value)
    if len(out) != n:
        shown = ",".join(map(str, out)) if all(isinstance(v, (int, float, str)) for v in out) else repr(value)
        raise error(f"{what}: give one value for all {n} stages or one per stage ({n} of them), got {len(out)}: {shown}")
    return out


# --- carries: batch-first tensors, possibly nested in dicts, lists and tuples ------------------------

def carry_take(carry, rows: np.ndarray):
    """The rows ``rows`` (positions or a boolean mask) of every tensor in ``carry``."""
    if carry is None:
        return None
    if isinstance(carry, dict):
        return {k: carry_take(v, rows) for k, v in carry.items()}
    if isinstance(carry, (list, tuple)):
        return type(carry)(carry_take(v, rows) for v in carry)
    if isinstance(carry, np.ndarray):
        return carry[rows]
    import torch

    rows = np.flatnonzero(rows) if rows.dtype == bool else rows
    return carry[torch.as_tensor(rows, dtype=torch.long, device=carry.device)]


def carry_cat(pieces: list):
    """One carry from pieces of the same structure, rows in order."""
    if len(pieces) == 1 or pieces[0] is None:
        return pieces[0]
    first = pieces[0]
    if isinstance(first, dict):
        return {k: carry_cat([p[k] for p in pieces]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(carry_cat([p[j] for p in pieces]) for j in range(len(first)))
    if isinstance(first, np.ndarray):
        return np.concatenate(pieces)
    import torch

    return torch.cat(pieces)


def carry_rows(carry, n: int) -> list:
    """A batch's carry as ``n`` per-sample carries (the same structure, one row each, copied: a view
    would pickle the whole batch's storage when a row crosses to another process)."""
    if carry is None:
        return [None] * n
    if isinstance(carry, dict):
        cols = {k: carry_rows(v, n) for k, v in carry.items()}
        return [{k: cols[k][i] for k in carry} for i in range(n)]
    if isinstance(carry, (list, tuple)):
        cols = [carry_rows(v, n) for v in carry]
        return [type(carry)(c[i] for c in cols) for i in range(n)]
    if isinstance(carry, np.ndarray):
        return [carry[i].copy() for i in range(n)]
    return [carry[i].cpu().clone() for i in range(n)]


def carry_stack(rows: list, device=None):
    """The inverse of `carry_rows`: per-sample carries stacked into one batch (on ``device``)."""
    first = rows[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: carry_stack([r[k] for r in rows], device) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(carry_stack([r[j] for r in rows], device) for j in range(len(first)))
    if isinstance(first, np.ndarray):
        return np.stack(rows)
    import torch

    out = torch.stack(rows)
    return out if device is None else out.to(device)


class _Queue:
    """Samples waiting for one stage: pieces of (input indices, their carry), oldest first."""

    def __init__(self) -> None:
        self.pieces: list[tuple[np.ndarray, Any]] = []
        self.count = 0

    def put(self, idx: np.ndarray, carry) -> None:
        if len(idx):
            self.pieces.append((idx, carry))
            self.count += len(idx)

    def pop(self, k: int) -> tuple[np.ndarray, Any]:
        """The oldest ``k`` samples (fewer if fewer wait), as one batch."""
        idxs, carries, got = [], [], 0
        while self.pieces and got < k:
            idx, carry = self.pieces[0]
            need = k - got
            if len(idx) <= need:
                self.pieces.pop(0)
            else:
                head = np.arange(need)
                self.pieces[0] = (idx[need:], carry_take(carry, np.arange(need, len(idx))))
                idx, carry = idx[:need], carry_take(carry, head)
            idxs.append(idx)
            carries.append(carry)
            got += len(idx)
        self.count -= got
        return (idxs[0] if len(idxs) == 1 else np.concatenate(idxs)), carry_cat(carries)


def to_numpy(x) -> np.ndarray:
    """A stage's output (a tensor on any device, or an array) as a NumPy array."""
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def run(stages: Sequence[BatchStage], thresholds: Sequence[float], n: int, take: Callable[[np.ndarray], Any],
        on_answer: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None], batch_size: int = 64,
        refill: bool = True, pipeline: bool = False,
        on_run: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> None:
    """Run ``n`` samples through ``stages``; stage i answers those whose confidence passes
    ``thresholds[i]`` (one per stage but the last, which answers the rest).

    ``take(idx)`` gives the images of input indices ``idx`` (an int64 array). For each batch a
    stage answers, ``on_answer(i, idx, pred, conf)`` is called at once, before any later stage runs
    on that batch's survivors (a service sends those answers then). Input is fed in
    ``batch_size`` chunks. With ``refill`` a later stage waits until ``batch_size`` survivors have
    gathered, so it runs full batches; only its last batch may be short. Without, each chunk's
    survivors go on at once. ``pipeline`` runs each later stage in its own thread, fed by a queue:
    the batches, and so the answers, are those of the sequential path. A failure in any stage is
    raised here once every thread has stopped. ``on_run(i, idx, pred, conf)``, if given, sees every
    sample a stage ran on, answered or not (a replica counts its batches with it).
    """
    S = len(stages)
    if S == 0:
        raise UsageError("a cascade needs at least one stage")
    if len(thresholds) != S - 1:
        raise UsageError(f"{S} stages need {S - 1} thresholds, got {len(thresholds)}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be ≥ 1, got {batch_size}")

    def step(i: int, idx: np.ndarray, carry) -> tuple[np.ndarray, Any]:
        """Stage i on samples idx: answer those it answers; return the rest, for stage i + 1."""
        st = stages[i]
        pred, conf, out = st(take(idx) if getattr(st, "needs_images", True) else None, carry)
        pred, conf = to_numpy(pred), to_numpy(conf)
        if on_run is not None:
            on_run(i, idx, pred, conf)
        done = np.ones(len(idx), bool) if i == S - 1 else exits(conf, thresholds[i])
        on_answer(i, idx[done], pred[done], conf[done])
        if done.all():
            return idx[:0], None
        keep = ~done
        return idx[keep], (None if out is None else carry_take(out, keep))

    chunks = [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(0, n, batch_size)]
    if pipeline and S > 1:
        _pipelined(step, S, chunks, batch_size, refill)
        return
    waiting = [_Queue() for _ in range(S)]

    def drain(i: int, full_only: bool) -> None:
        while waiting[i].count >= (batch_size if full_only else 1):
            idx, carry = waiting[i].pop(batch_size)
            left, out = step(i, idx, carry)
            if i + 1 < S:
                waiting[i + 1].put(left, out)

    for idx in chunks:
        waiting[0].put(idx, None)
        drain(0, full_only=False)
        for i in range(1, S):
            drain(i, full_only=refill)
    for i in range(1, S):  # the short tail batches, earlier stages first so their survivors join later queues
        drain(i, full_only=False)


def _pipelined(step, num_stages: int, chunks: list[np.ndarray], batch_size: int, refill: bool) -> None:
    """Stage 0 on ``chunks`` in this thread, each later stage in a thread of its own.

    Stage i + 1 receives stage i's survivors, in the order stage i produced them, through a queue,
    and forms its batches exactly as the sequential path does: with ``refill``, full batches while
    stage i still runs and the rest in ``batch_size`` pieces once it is done; without, each
    arrival as it is. A failure in any stage stops the others after their current batch.
    """
    import torch

    queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(num_stages)]
    failed: list[BaseException] = []

    def hand_on(i: int, left: tuple[np.ndarray, Any]) -> None:
        if i + 1 < num_stages and len(left[0]):
            queues[i + 1].put(left)

    @torch.inference_mode()  # grad mode is per thread: the caller's does not reach this one
    def stage_loop(i: int) -> None:
        held = _Queue()
        try:
            while (item := queues[i].get()) is not None:
                if failed:
                    continue  # another stage failed: skip the work, but read on until the stage before ends
                if not refill:
                    hand_on(i, step(i, *item))
                    continue
                held.put(*item)
                while held.count >= batch_size and not failed:
                    hand_on(i, step(i, *held.pop(batch_size)))
            while held.count and not failed:
                hand_on(i, step(i, *held.pop(batch_size)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            failed.append(e)
        finally:
            if i + 1 < num_stages:
                queues[i + 1].put(None)  # this stage is done: the next one may run its short tail

    workers = [threading.Thread(target=stage_loop, args=(i,), name=f"tinysaver-stage-{i}", daemon=True)
               for i in range(1, num_stages)]
    for w in workers:
        w.start()
    try:
        for idx in chunks:
            if failed:
                break
            hand_on(0, step(0, idx, None))
    except BaseException as e:  # noqa: BLE001
        failed.append(e)
    finally:
        queues[1].put(None)
        for w in workers:
            w.join()
    if failed:
        raise failed[0]


class ModelStage:
    """A saver or base as a stage: its model on its runner (backend), device and temperature.

    ``images`` → the model's own input (``prepare_batch`` with its preprocessing) → logits →
    (class, confidence) by ``policy.confidence``; hands nothing on.
    """

    needs_images = True

    def __init__(self, model, runner, temperature: float = 1.0, device="cpu", half: bool = False,
                 channels_last: bool = False):
        self.model, self.runner, self.temperature = model, runner, float(temperature)
        self.device, self.half, self.channels_last = device, half, channels_last
        self.name = model.key

    def __call__(self, images, carry=None):
        import torch

        from .transforms import prepare_batch

        with torch.inference_mode():
            x = prepare_batch(images, self.model.preprocess).to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.half:
                x = x.half()
            conf, pred = confidence(self.runner(x), self.temperature)
        return pred.cpu(), conf.cpu(), None


__all__ = ["BatchStage", "ModelStage", "run", "per_stage", "carry_take", "carry_cat", "carry_rows", "carry_stack", "to_numpy"]
