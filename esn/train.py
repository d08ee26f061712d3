"""Train an ESN on a frozen saver–base pair from a zoo.

The config mirrors the paper's Table 7 (``esn/configs/default.yaml``). With ``feature_cache`` the
frozen backbones run once over the training set and every epoch reuses their pooled features, so
augmentation must be off; without it, AutoAugment, mixup and cutmix come from torchvision/timm.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tinysaver.errors import MissingFileError, UsageError
from tinysaver.schemas import ESNCheckpointSchema, ESNSettingsSchema, parse
from tinysaver.yamlfile import read_mapping
from tinysaver.zoo import atomic_write_bytes

from .model import ESNConfig, ExitSequenceNetwork, esn_loss
from .pair import Pair  # noqa: F401 (re-exported: the pair is what training takes)
from .staged import pooled, saver_outputs


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 6.25e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # Table 7 lists 20 warm-up epochs for 10 training epochs; see README
    num_layers: int = 1
    dim: int = 128
    num_heads: int = 8
    granularity: str = "stage"
    autoaugment: bool = False
    mixup: float = 0.0  # Table 7: 0.8
    cutmix: float = 0.0  # Table 7: 1.0
    feature_cache: bool = True
    train_split: str = "train"
    train_limit: int | None = None
    seed: int = 0
    label_free: bool = False  # learn the base's outputs (seed 001): no label is read

    def __post_init__(self) -> None:
        if self.feature_cache and (self.autoaugment or self.mixup or self.cutmix):
            raise UsageError("the feature cache stores un-augmented features: turn autoaugment, mixup and "
                             "cutmix off, or set feature_cache: false")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError("epochs and batch_size must be ≥ 1 and lr > 0")

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> "TrainSettings":
        d = read_mapping(path, "an ESN settings file") if path else {}
        d.update({k: v for k, v in overrides.items() if v is not None})
        parse(ESNSettingsSchema, d, str(path or "ESN settings"))  # one line naming the field and the rule
        return cls(**d)


def frozen_features(pair: Pair, images, batch_size: int = 256, desc: str | None = None) -> dict[str, torch.Tensor]:
    """Saver pre-logits (N, D), saver logits (N, K), pooled base stage features [(N, C_n)], base logits.

    ``pair.saver`` may be None (exits inside the base only): then the saver entries are absent.
    ``desc``: show a progress bar over the batches on stderr, with this label (a minute's work on
    10k images here)."""
    from tinysaver.transforms import prepare_batch

    out: dict[str, list] = {"saver_feat": [], "saver_logits": [], "base_logits": []}
    stage_feats: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
            chunk = images[s:s + batch_size]
            feats, bl = pair.base_staged.forward_all(prepare_batch(chunk, pair.base.preprocess))
            if pair.saver is not None:  # a pair without a saver feeds exits inside the base only
                sf, sl = saver_outputs(pair.saver.module, prepare_batch(chunk, pair.saver.preprocess))
                out["saver_feat"].append(sf)
                out["saver_logits"].append(sl)
            out["base_logits"].append(bl)
            if not stage_feats:
                stage_feats = [[] for _ in feats]
            for i, f in enumerate(feats):
                stage_feats[i].append(pooled(f))
    res = {k: torch.cat(v) for k, v in out.items() if v}
    res["stage_feats"] = [torch.cat(f) for f in stage_feats]
    return res


def _batches(n: int, bs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for s in range(0, n, bs):
        yield perm[s:s + bs]


def build_esn(pair: Pair, settings: TrainSettings) -> ExitSequenceNetwork:
    input_size = pair.base.preprocess.input_size
    with torch.inference_mode():
        sf, _ = saver_outputs(pair.saver.module, torch.zeros(1, *pair.saver.preprocess.input_size))
    cfg = ESNConfig(saver_dim=sf.shape[-1], stage_dims=tuple(pair.base_staged.stage_channels(input_size)),
                    num_classes=pair.base.num_classes, dim=settings.dim, num_layers=settings.num_layers,
                    num_heads=settings.num_heads)
    return ExitSequenceNetwork(cfg)


def train_esn(pair: Pair, data, settings: TrainSettings, log=print, progress: bool = True,
              cache: dict | None = None) -> ExitSequenceNetwork:
    """Train on ``data`` (a DecodedSet); the backbones stay frozen (no gradients reach them).

    ``cache`` may pass features already computed by `frozen_features` on ``data``.
    """
    from tinysaver.train import warmup_cosine

    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    esn = build_esn(pair, settings)
    opt = torch.optim.AdamW(esn.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(data)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    sched = warmup_cosine(opt, int(settings.warmup_epochs * steps_per_epoch), total)
    # label-free runs never touch data.labels: their target and their logged accuracy come from the base
    labels = None if settings.label_free else torch.as_tensor(data.labels)
    if settings.feature_cache and cache is None:
        cache = frozen_features(pair, data.images)
    elif not settings.feature_cache:
        cache = None
    mixer = _mixer(settings, pair.base.num_classes)
    for epoch in range(settings.epochs):
        esn.train()
        correct = np.zeros(esn.num_exits)
        seen = 0
        t0 = time.perf_counter()
        for idx in tqdm(_batches(n, settings.batch_size, gen), total=steps_per_epoch,
                        desc=f"esn epoch {epoch + 1}/{settings.epochs}", disable=not progress, leave=False):
            y = None if labels is None else labels[idx]
            if cache is not None:
                sf, sl = cache["saver_feat"][idx], cache["saver_logits"][idx]
                feats, bl = [f[idx] for f in cache["stage_feats"]], cache["base_logits"][idx]
                target = y
            else:
                sf, sl, feats, target, bl = _live_features(pair, data, idx, y, settings, mixer)
            if settings.label_free:
                y = bl.argmax(-1)  # the train "accuracy" logged below is agreement with the base
                target = bl.float().softmax(-1)
            logits = esn(sf, feats, sl)
            loss = esn_loss(logits, target, sl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(-1) == y).sum(-1).detach().numpy()
            seen += len(idx)
        accs = ", ".join(f"{100 * c / seen:.1f}" for c in correct)
        what = "agreement with the base" if settings.label_free else "accuracy"
        log(f"epoch {epoch + 1}: loss {loss.item():.4f}, train {what} per exit (%): {accs} "
            f"({time.perf_counter() - t0:.1f}s)")
    esn.eval()
    return esn


def _mixer(settings: TrainSettings, num_classes: int):
    if not (settings.mixup or settings.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, num_classes=num_classes,
                 label_smoothing=0.0)


def _live_features(pair: Pair, data, idx, y, settings: TrainSettings, mixer):
    """Augment raw images, then run the frozen backbones (no grad) on them."""
    from tinysaver.decoding import take_images
    from tinysaver.transforms import prepare_batch

    imgs = take_images(data.images, idx)
    if settings.autoaugment:
        from torchvision.transforms import v2

        aa = v2.AutoAugment()
        imgs = [aa(im) for im in imgs]
    xs = prepare_batch(imgs, pair.saver.preprocess)
    xb = prepare_batch(imgs, pair.base.preprocess)
    target = y
    if mixer is not None and y is not None and len(idx) % 2 == 0:
        # one mix decision for both views: mix the base view, apply the same lam/perm to the saver view
        state = torch.get_rng_state()
        xb, target = mixer(xb, y)
        torch.set_rng_state(state)
        xs, _ = mixer(xs, y)
    with torch.no_grad():
        sf, sl = saver_outputs(pair.saver.module, xs)
        feats, bl = pair.base_staged.forward_all(xb)
    return sf, sl, [pooled(f) for f in feats], target, bl


def save_esn(path: str | Path, esn: ExitSequenceNetwork, pair: Pair, settings: TrainSettings,
             extra: dict | None = None) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": esn.state_dict(), "config": esn.cfg.to_dict(), "settings": asdict(settings),
                "zoo": pair.zoo, "saver": pair.saver_key, "base": pair.base_key, **(extra or {})}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


@dataclass(frozen=True)
class ESNCheckpoint:
    """What an ESN checkpoint records besides its weights: the zoo and pair it was trained on, its
    training settings (``TrainSettings`` as a dict) and the network's config; ``extra``: anything
    training added (its history, say)."""

    path: Path
    zoo: str
    saver: str
    base: str
    settings: dict
    config: dict
    extra: dict = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        """Where the base was cut into stages ("stage" or "block")."""
        return self.settings["granularity"]


def load_esn(path: str | Path, saver: str | None = None,
             base: str | None = None) -> tuple[ExitSequenceNetwork, ESNCheckpoint]:
    """Load an ESN checkpoint; refuse one made for a different saver or base."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such ESN checkpoint; train one with 'tinysaver esn train'")
    try:
        # weights only: a checkpoint is data, and unpickling anything else would run a stranger's code
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean the same to the user
        first = " ".join(str(e).split())[:120]
        raise UsageError(f"{path} is not a checkpoint from 'tinysaver esn train' ({first or type(e).__name__})") \
            from None
    if not isinstance(ck, dict):
        raise UsageError(f"{path} is not a checkpoint from 'tinysaver esn train' (it holds a {type(ck).__name__})")
    parse(ESNCheckpointSchema, ck, str(path))
    for role, want in (("saver", saver), ("base", base)):
        if want is not None and ck[role] != want:
            raise UsageError(f"{path} was trained for {role} {ck[role]!r}, not {want!r}")
    cfg = dict(ck["config"])
    cfg["stage_dims"] = tuple(cfg["stage_dims"])
    esn = ExitSequenceNetwork(ESNConfig(**cfg))
    esn.load_state_dict(ck["state_dict"])
    known = ("state_dict", "config", "saver", "base", "zoo", "settings")
    return esn.eval(), ESNCheckpoint(Path(path), ck["zoo"], ck["saver"], ck["base"], dict(ck["settings"]),
                                     dict(ck["config"]), {k: v for k, v in ck.items() if k not in known})


def esn_splits(zoo, seed: int = 0, limit: int | None = None, train: bool = True):
    """(train, calib, test) DecodedSets: the zoo's own splits, or its first split cut 50/25/25; the
    first ``limit`` images of each when given. ``train=False`` skips decoding train (None in its place)
    where only calib and test are read (evaluation)."""
    from tinysaver.data import load_dataset

    names = ("train", "calib", "test")
    if all(n in zoo.splits for n in names):
        sets = []
        for n in names:
            if n == "train" and not train:
                sets.append(None)
                continue
            ds = load_dataset(zoo.splits[n]["source"], progress=False, limit=None)
            if ds.fingerprint != zoo.splits[n]["fingerprint"]:
                raise UsageError(f"split {n!r} on disk differs from the one zoo {zoo.name!r} was profiled on")
            sets.append(ds if limit is None else ds.subset(range(min(limit, len(ds)))))
        return tuple(sets)
    first = next(iter(zoo.splits))
    ds = load_dataset(zoo.splits[first]["source"], progress=False)
    perm = np.random.default_rng(seed).permutation(len(ds))
    a, b = len(ds) // 2, 3 * len(ds) // 4
    parts = [np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:])]
    if limit is not None:
        parts = [p[:limit] for p in parts]
    return tuple(ds.subset(p) if train or k else None for k, p in enumerate(parts))


__all__ = ["TrainSettings", "frozen_features", "build_esn", "train_esn", "save_esn", "ESNCheckpoint",
           "load_esn", "esn_splits"]
