"""SDN internal classifiers (Kaya et al., 2019), as the seeds ``002_*`` and ``004_*`` use them.

One classifier per base stage: global average pooling, then a linear layer to the classes. The base
stays frozen (the "IC-only" setting of seed ``004_*``); `esn.regimes` trains it jointly too.
The loss is the sum over exits of the cross-entropy to the target, which is a label or, for
label-free training, the base's own probabilities (soft targets: the KL to the base plus a constant).
"""
from __future__ import annotations

import torch
from torch import nn

from .staged import pooled


class SDN(nn.Module):
    uses_saver = False

    def __init__(self, stage_dims: tuple[int, ...], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for c in stage_dims)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, stage_feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, B, K) logits from (B, C_n) pooled features or raw stage maps."""
        return torch.stack([h(f if f.dim() == 2 else pooled(f)) for h, f in zip(self.heads, stage_feats)])

    def offline(self, feats: dict) -> torch.Tensor:
        return self(feats["stage_feats"])

    def begin(self, saver_feat, saver_logits):
        return None

    def step(self, n: int, stage_out: torch.Tensor, state):
        return self.heads[n - 1](pooled(stage_out)), state

    def select(self, state, keep):
        return state


def exits_loss(exit_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_n mean CE(exit_n, target); ``target`` is (B,) classes or (B, K) probabilities."""
    return sum(nn.functional.cross_entropy(lg.float(), target) for lg in exit_logits)


__all__ = ["SDN", "exits_loss"]
