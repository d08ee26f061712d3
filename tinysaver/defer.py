"""Savers trained to defer: fine-tune a zoo's saver so that its confidence says when to pass an input on.

A cascade asks one thing of a saver's confidence: *is my answer as good as the base's?* A saver
trained for accuracy alone was never asked that. `train_saver` fine-tunes it on the zoo's
``train`` split with one of the losses registered here, keeps a seeded part of ``train`` apart to
stop early and to choose α, and never reads ``calib`` or ``test``, so that the selector's choice and
guarantees on those stay valid. The result is a new zoo entry, ``<saver>.defer-<base>``, profiled as
any model (same FLOPs, new predictions), with its training settings in the manifest.

Losses, on a batch of saver logits (B, K), labels (B,) and the base's recorded classes (B,):

- ``gatekeeper`` (Rabanser et al., 2025): cross-entropy where the saver is right, and α · KL(uniform ‖
  softmax) where it is wrong, which pulls a wrong answer's confidence down;
- ``base-aware`` (ours): a sample must be deferred only where passing it on helps, where the saver
  disagrees with the base and the base is right (``label_free``: wherever they disagree); there the
  distribution is pulled to uniform (weight α); where both are wrong the saver is left alone,
  because the base cannot repair it; elsewhere cross-entropy;
- ``esn-weighted``: cross-entropy weighted by 2·(1 − the saver's confidence), the ESN paper's weight;
- ``cross-entropy``: the control, the same fine-tuning with no deferral term (α unused).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .errors import UsageError, ZooError
from .policy import confidence
from .registry import Registry

# torch is imported where it is used, so that the command line lists the losses and defaults
# without loading it

# ``fn(logits, labels, base_pred, alpha, label_free) -> scalar loss``, registered with @register_defer_loss(name)
DEFER_LOSSES: Registry[Callable] = Registry("loss", UsageError)
register_defer_loss, defer_losses, get_defer_loss = DEFER_LOSSES.register, DEFER_LOSSES.names, DEFER_LOSSES.get


def _to_uniform(logits):
    """KL(uniform ‖ softmax(logits)) per sample, (B,): 0 only when every class is equally likely."""
    import torch.nn.functional as F

    return -F.log_softmax(logits.float(), dim=1).mean(dim=1) - math.log(logits.shape[1])


@register_defer_loss("gatekeeper")
def gatekeeper_loss(logits, labels, base_pred, alpha: float, label_free: bool = False):
    import torch.nn.functional as F

    target = base_pred if label_free else labels
    right = (logits.argmax(1) == target).float()
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (right * ce + alpha * (1 - right) * _to_uniform(logits)).mean()


@register_defer_loss("base-aware")
def base_aware_loss(logits, labels, base_pred, alpha: float, label_free: bool = False):
    import torch.nn.functional as F

    pred = logits.argmax(1)
    disagree = pred != base_pred
    if label_free:
        defer, keep, target = disagree, ~disagree, base_pred
    else:
        defer = disagree & (base_pred == labels)
        both_wrong = (pred != labels) & (base_pred != labels)
        keep, target = ~defer & ~both_wrong, labels
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (keep.float() * ce + alpha * defer.float() * _to_uniform(logits)).mean()


@register_defer_loss("cross-entropy")
def cross_entropy_loss(logits, labels, base_pred, alpha: float = 0.0, label_free: bool = False):
    """The control: the same fine-tuning without a deferral term (α is not used)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), base_pred if label_free else labels)


@register_defer_loss("esn-weighted")
def esn_weighted_loss(logits, labels, base_pred, alpha: float, label_free: bool = False):
    import torch.nn.functional as F

    target = base_pred if label_free else labels
    w = 2.0 * (1.0 - confidence(logits.detach())[0])
    return (w * F.cross_entropy(logits.float(), target, reduction="none")).mean()


@dataclass(frozen=True)
class DeferSettings:
    """How a saver is fine-tuned. ``alphas``: the α values tried (the best on the held-out part of
    ``train`` is kept); ``holdout``: the share of ``train`` kept apart for that choice and for early
    stopping (``patience`` epochs without a better held-out score); ``limit``: the first N samples of
    ``train`` only (a quick run)."""

    loss: str = "gatekeeper"
    alphas: tuple[float, ...] = (0.5,)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-4
    holdout: float = 0.1
    patience: int = 2
    label_free: bool = False
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        get_defer_loss(self.loss)
        if not self.alphas or not all(isinstance(a, (int, float)) and 0 <= a < math.inf for a in self.alphas):
            raise UsageError(f"α values are numbers ≥ 0, got {self.alphas}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise UsageError("epochs, batch size and patience must be ≥ 1")
        if not 0 < self.holdout < 0.5:
            raise UsageError(f"--holdout is a share of train in (0, 0.5), got {self.holdout}")
        if not 0 < self.lr < 1:
            raise UsageError(f"the learning rate must be in (0, 1), got {self.lr}")
        if self.limit is not None and self.limit < 20:
            raise UsageError(f"--limit keeps the first N train samples; give at least 20, got {self.limit}")


@dataclass
class DeferResult:
    """What training chose: the fine-tuned weights, its α and epoch, and the held-out zero-loss exit
    ratio of the saver before and after (on the part of ``train`` kept apart)."""

    state_dict: dict = field(repr=False)
    alpha: float
    epoch: int
    holdout_exit_before: float
    holdout_exit_after: float
    interrupted: bool
    seconds: float
    history: list[dict]


def defer_key(saver: str, base: str) -> str:
    return f"{saver}.defer-{base}"


def holdout_exit_ratio(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, base_pred: np.ndarray,
                       label_free: bool) -> float:
    """The share of samples a saver with these outputs answers at zero loss against the base."""
    from .sweep import SaverOrder, best_exit

    if label_free:
        correct, base_correct = pred == base_pred, np.ones(len(pred), bool)
    else:
        correct, base_correct = pred == labels, base_pred == labels
    k, _ = best_exit(SaverOrder.build(conf, correct), base_correct, "zero")
    return k / len(pred)


def saver_outputs(module, images, index, preprocess, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(conf, pred), each (len(index),), of ``module`` in eval mode on the images at ``index``."""
    import torch

    from .decoding import take_images
    from .transforms import prepare_batch

    module.eval()
    confs, preds = [], []
    with torch.no_grad():
        for s in range(0, len(index), batch_size):
            c, p = confidence(module(prepare_batch(take_images(images, index[s:s + batch_size]), preprocess)))
            confs.append(c.numpy())
            preds.append(p.numpy())
    return np.concatenate(confs), np.concatenate(preds)


def fine_tune_epoch(module, preprocess, images, order: np.ndarray, labels: np.ndarray, base_pred: np.ndarray, opt,
                    loss: str, alpha: float, label_free: bool = False, batch_size: int = 128,
                    bar: str | None = None) -> float:
    """One pass of ``module`` over ``images[order]`` in batches, stepping ``opt`` on the defer loss
    ``loss``; ``labels`` and ``base_pred`` (N,) index like ``images``. Returns the mean loss;
    ``bar``: the progress bar's title (None: no bar)."""
    import torch
    from .decoding import take_images
    from .transforms import prepare_batch

    loss_fn = get_defer_loss(loss)
    y_all, b_all = torch.from_numpy(labels), torch.from_numpy(base_pred)
    module.train()
    total = 0.0
    for b0 in tqdm(range(0, len(order), batch_size), desc=bar, unit="batch", disable=bar is None, leave=False):
        idx = order[b0:b0 + batch_size]
        value = loss_fn(module(prepare_batch(take_images(images, idx), preprocess)), y_all[idx], b_all[idx], alpha,
                        label_free)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        total += value.item() * len(idx)
    return total / max(len(order), 1)


def train_saver(zoo, saver: str, base: str, settings: DeferSettings | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> DeferResult:
    """Fine-tune ``saver`` of ``zoo`` to defer to ``base``, reading only the ``train`` split.

    The images of ``train`` are decoded (and checked against the split's fingerprint); the base's
    classes on them are the zoo's recorded predictions. Ctrl-C stops training and keeps the best
    weights so far (``interrupted``), or re-raises when no epoch has finished.
    """
    import torch

    from .data import load_dataset

    s = settings or DeferSettings()
    if saver == base:
        raise UsageError(f"a model cannot be its own saver: {saver!r} is the base")
    if "train" not in zoo.splits:
        raise ZooError(f"zoo {zoo.name!r} has no 'train' split to fine-tune on (splits: {', '.join(zoo.splits)}); "
                       "calib and test are never trained on, so that the selector's guarantees hold")
    for m in (saver, base):
        if not zoo.has_predictions(m):
            raise ZooError(f"{m!r} in zoo {zoo.name!r} has no predictions on 'train'")
    meta = zoo.splits["train"]
    data = load_dataset(meta["source"], progress=progress, limit=s.limit)
    ids, labels = zoo.split_arrays("train")
    n = len(data)
    if s.limit is None and data.fingerprint != meta["fingerprint"]:
        raise ZooError(f"split 'train' on disk differs from the one zoo {zoo.name!r} was profiled on")
    if [str(i) for i in ids[:n]] != [str(i) for i in data.ids] or not np.array_equal(labels[:n], data.labels):
        raise ZooError(f"the first {n} samples of 'train' on disk are not the ones zoo {zoo.name!r} recorded")
    base_pred = zoo.predictions(base, "train").pred[:n].astype(np.int64)
    labels = labels[:n].astype(np.int64)
    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(n)
    n_hold = max(10, int(round(s.holdout * n)))
    hold, fit = np.sort(perm[:n_hold]), perm[n_hold:]
    t_start = time.perf_counter()

    model = zoo.load_model(saver)
    pre = model.preprocess
    start_state = {k: v.clone() for k, v in model.module.state_dict().items()}
    c0, p0 = saver_outputs(model.module, data.images, hold, pre, 256)
    before = holdout_exit_ratio(c0, p0, labels[hold], base_pred[hold], s.label_free)
    log(f"{saver}: held-out zero-loss exits before fine-tuning {100 * before:.1f} % "
        f"({len(fit)} train samples, {len(hold)} held out)")
    best = None  # (score, alpha, epoch, state)
    history: list[dict] = []
    interrupted = False
    try:
        for alpha in s.alphas:
            torch.manual_seed(s.seed)
            model.module.load_state_dict(start_state)
            opt = torch.optim.AdamW(model.module.parameters(), lr=s.lr, weight_decay=0.0)
            stale = 0
            own_best = -1.0
            for epoch in range(1, s.epochs + 1):
                order = fit[np.random.default_rng(s.seed * 1000 + epoch).permutation(len(fit))]
                mean_loss = fine_tune_epoch(model.module, pre, data.images, order, labels, base_pred, opt, s.loss,
                                            float(alpha), s.label_free, s.batch_size,
                                            f"α={alpha:g} epoch {epoch}/{s.epochs}" if progress else None)
                c, p = saver_outputs(model.module, data.images, hold, pre, 256)
                score = holdout_exit_ratio(c, p, labels[hold], base_pred[hold], s.label_free)
                history.append({"alpha": float(alpha), "epoch": epoch, "loss": mean_loss,
                                "holdout_exit": score, "holdout_acc": float((p == labels[hold]).mean())})
                log(f"α={alpha:g} epoch {epoch}: loss {mean_loss:.4f}, held-out zero-loss exits "
                    f"{100 * score:.1f} %, saver accuracy {100 * history[-1]['holdout_acc']:.2f} %")
                if best is None or score > best[0]:
                    best = (score, float(alpha), epoch, {k: v.detach().clone() for k, v in model.module.state_dict().items()})
                if score > own_best:
                    own_best, stale = score, 0
                else:
                    stale += 1
                    if stale >= s.patience:
                        break
    except KeyboardInterrupt:
        if best is None:
            raise
        interrupted = True
        log(f"interrupted: keeping the best weights so far (α={best[1]:g}, epoch {best[2]}, held-out zero-loss "
            f"exits {100 * best[0]:.1f} %)")
    score, alpha, epoch, state = best
    return DeferResult(state, alpha, epoch, before, score, interrupted, time.perf_counter() - t_start, history)


def add_to_zoo(zoo, saver: str, base: str, result: DeferResult, settings: DeferSettings,
               root: Path | None = None, progress: bool = True, log: Callable[[str], None] = print) -> str:
    """Write ``result``'s weights beside the saver's checkpoint when it lies in the zoo's root (else in
    the zoo's own ``checkpoints`` folder), atomically, and profile them into
    ``zoo`` as ``<saver>.defer-<base>``: the same model and FLOPs, new predictions on every split,
    and the training settings under ``trained``. Returns the new key."""
    from safetensors.torch import save

    from .profiler import ProfileConfig, profile
    from .zoo import MANIFEST, atomic_write_bytes, atomic_write_yaml, load_zoo, model_dirname, writable, zoo_lock

    zoo = writable(zoo, root, log)  # a bundled zoo is copied to the write root first, never written in place
    key = defer_key(saver, base)
    spec = zoo.model_spec(saver)
    # beside the saver's checkpoint when that lies with the zoo; a zoo copied elsewhere finds its
    # savers' checkpoints in the package's checkout, and must not write there
    here = Path(spec.checkpoint).parent.resolve() if spec.checkpoint else None
    folder = here if here is not None and here.is_relative_to(zoo.path.parent.resolve()) else zoo.path / "checkpoints"
    ck = folder / f"{key.replace('/', '_')}.safetensors"
    atomic_write_bytes(ck, save({k: v.contiguous() for k, v in result.state_dict.items()}))
    # a retrained saver of the same name: its old predictions must not be taken as this one's
    shutil.rmtree(zoo.path / "preds" / model_dirname(key), ignore_errors=True)
    spec = dataclasses.replace(spec, checkpoint=str(ck), label=key, pretrained=False)
    sizes = sorted(int(b[2:]) for b in ((zoo.entry(saver).latency or {}).get("table") or {}))
    cfg = ProfileConfig(zoo.name, {s: m["source"] for s, m in zoo.splits.items()}, [spec], batch_sizes=sizes,
                        force=True)
    profile(cfg, zoo.path.parent, progress=progress, log=log)
    with zoo_lock(zoo.path):
        z = load_zoo(str(zoo.path))
        z.manifest["models"][key]["trained"] = {
            "from": saver, "for": base, **{k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in asdict(settings).items()},
            "alpha_chosen": result.alpha, "epoch_chosen": result.epoch,
            "holdout_exit_before": round(result.holdout_exit_before, 6),
            "holdout_exit_after": round(result.holdout_exit_after, 6),
            "interrupted": result.interrupted, "seconds": round(result.seconds, 1)}
        atomic_write_yaml(z.path / MANIFEST, z.manifest)
    return key


__all__ = ["DeferResult", "DeferSettings", "add_to_zoo", "defer_key", "defer_losses", "fine_tune_epoch", "get_defer_loss",
           "holdout_exit_ratio", "saver_outputs", "register_defer_loss", "train_saver"]
