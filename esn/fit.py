"""One training loop for exit heads on cached features (SDN, ZTW's classifiers and ensemble).

The backbones are frozen, so every epoch reuses `esn.train.frozen_features`. ``target`` is
(N,) labels, or (N, K) probabilities of the base for label-free training.
"""
from __future__ import annotations

import math

import torch

from .sdn import exits_loss
from .train import _batches
from tinysaver.errors import UsageError


def fit_exits(forward, params, cache: dict, target: torch.Tensor, epochs: int = 10, batch_size: int = 256,
              lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, loss=exits_loss) -> None:
    """Minimise ``loss(forward(batch_feats), target)`` over ``params`` with AdamW and a cosine schedule.

    ``forward`` maps a dict of cached features for one batch (``stage_feats``, ``saver_feat``,
    ``saver_logits``, ``base_logits``) to (N_exits, B, K) logits.
    """
    from tinysaver.train import warmup_cosine

    params = [p for p in params if p.requires_grad]
    if not params:
        raise UsageError("nothing to train: no parameter requires a gradient")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(target)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = warmup_cosine(opt, min(steps // 10, math.ceil(n / batch_size)), steps)
    for _ in range(epochs):
        for idx in _batches(n, batch_size, gen):
            batch = {k: ([f[idx] for f in v] if isinstance(v, list) else v[idx]) for k, v in cache.items()}
            out = loss(forward(batch), target[idx])
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            sched.step()


__all__ = ["fit_exits"]
