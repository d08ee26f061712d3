"""Training regimes for SDN exits (seed ``002_*``): disjoint, joint and mixed.

- **disjoint** (phases 1 + 3): the zoo's trained base, frozen; only the exits learn.
- **joint** (phase 2): base and exits from a fresh initialisation, trained together on the sum of
  every exit's loss and the base head's, for the same number of samples the zoo's base was trained on.
- **mixed** (phases 1 + 2): the zoo's trained base, then base and exits trained together.

What each costs in base-head accuracy is the point: joint and mixed change the backbone. Training
uses the zoo's recipe (AdamW, warm-up and cosine, random horizontal flips).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from tinysaver.errors import UsageError
from tinysaver.models import create_model

from .fit import fit_exits
from .methods import ExitMethod
from .sdn import SDN, exits_loss
from .settings import REGIMES, RegimeSettings  # noqa: F401 (re-exported)
from .staged import pooled, staged
from .train import Pair, esn_splits, frozen_features


def _train_jointly(base, sdn: SDN, train, samples: int, lr: float, s: RegimeSettings) -> None:
    """Base and exits together: Σ_exits CE + CE of the base head, on flipped training images."""
    from tinysaver.decoding import take_images
    from tinysaver.train import _augment, warmup_cosine
    from tinysaver.transforms import prepare_batch

    gen = torch.Generator().manual_seed(s.seed)
    net, st = base.module, staged(base.module)
    params = [*net.parameters(), *sdn.parameters()]
    for p in params:
        p.requires_grad_(True)
    steps = math.ceil(samples / s.batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    sched = warmup_cosine(opt, min(50, steps // 5), steps)
    order = torch.cat([torch.randperm(len(train), generator=gen)
                       for _ in range(math.ceil(samples / len(train)))])[:samples]
    labels = torch.as_tensor(train.labels)
    net.train()
    sdn.train()
    for step in range(steps):
        idx = order[step * s.batch_size:(step + 1) * s.batch_size]
        imgs = take_images(train.images, idx)
        if isinstance(imgs, torch.Tensor):
            imgs = _augment(imgs, gen)
        else:  # images of different sizes: flip one by one
            imgs = [im.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else im for im in imgs]
        x = prepare_batch(imgs, base.preprocess)
        feats, logits = st.forward_all(x)
        y = labels[idx]
        loss = exits_loss(sdn([pooled(f) for f in feats]), y) + torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    sdn.eval()


def train_regime(zoo, base_key: str, regime: str, train, s: RegimeSettings | None = None):
    """(the base as a LoadedModel, its SDN exits) after training in ``regime``."""
    s = s or RegimeSettings()
    if regime not in REGIMES:
        raise UsageError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    if regime == "joint":  # a fresh base, seeded, with no checkpoint
        torch.manual_seed(s.seed)
        base = create_model(dataclasses.replace(zoo.model_spec(base_key), checkpoint=None))
    else:
        base = zoo.load_model(base_key)
    base.module.eval().requires_grad_(False)
    st = staged(base.module)
    torch.manual_seed(s.seed)
    sdn = SDN(tuple(st.stage_channels(base.preprocess.input_size)), base.num_classes)
    if regime == "disjoint":
        cache = frozen_features(Pair(zoo.name, None, base_key, None, base, st), train.images)
        fit_exits(lambda b: sdn(b["stage_feats"]), sdn.parameters(), cache, torch.as_tensor(train.labels),
                  epochs=s.heads_epochs, lr=s.heads_lr, seed=s.seed)
        sdn.eval()
    else:
        samples, lr = (s.joint_samples, s.joint_lr) if regime == "joint" else (s.mixed_samples, s.mixed_lr)
        _train_jointly(base, sdn, train, samples, lr, s)
    return base, sdn


def compare_regimes(zoo, base_key: str, regimes=REGIMES, s: RegimeSettings | None = None, train_limit=None,
                    log=print) -> list[dict]:
    """Per regime: base-head and per-exit test accuracy, and the shared policy search's budget table."""
    from .compare import CompareSettings, method_row

    s = s or RegimeSettings()
    train, calib, test = esn_splits(zoo, seed=s.seed, limit=train_limit)
    rows = []
    for regime in regimes:
        log(f"training the {regime} regime")
        base, sdn = train_regime(zoo, base_key, regime, train, s)
        pair = Pair(zoo.name, None, base_key, None, base, staged(base.module))
        feats = {n: frozen_features(pair, d.images) for n, d in (("calib", calib), ("test", test))}
        labels = {"calib": np.asarray(calib.labels), "test": np.asarray(test.labels)}
        row, _ = method_row(f"SDN, {regime}", ExitMethod(sdn), pair, feats, labels, None,
                         CompareSettings(wallclock_images=0), log=lambda m: None)
        row["base_head_acc"] = 100 * float((feats["test"]["base_logits"].argmax(-1).numpy() == labels["test"]).mean())
        with torch.inference_mode():
            ex = sdn.offline(feats["test"]).argmax(-1).numpy()
        row["exit_accs"] = [100 * float((e == labels["test"]).mean()) for e in ex]
        log(f"{regime}: base head {row['base_head_acc']:.2f}%, exits "
            + ", ".join(f"{a:.1f}" for a in row["exit_accs"]))
        rows.append(row)
    return rows


def format_regimes(rows: list[dict]) -> str:
    lines = ["| regime | base head acc | exit accs | 25% | 50% | 75% | 100% | FLOPs at zero loss (acc) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['base_head_acc']:.2f} | {', '.join(f'{a:.1f}' for a in r['exit_accs'])} | "
                     f"{r['acc@25%']} | {r['acc@50%']} | {r['acc@75%']} | {r['acc@100%']} | "
                     f"{r['zero_loss_flops_pct']:.1f}% ({r['zero_loss_acc']:.2f}) |")
    return "\n".join(lines)


__all__ = ["train_regime", "compare_regimes", "format_regimes"]
