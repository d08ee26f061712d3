"""Learned exit gates after JEI-DNN (seed ``003_*``), trained on frozen exits.

Gate n reads four uncertainty statistics of exit n's probabilities, ``[max p, entropy, entropy at
temperature GATE_T, top-1 − top-2 margin]``, through one linear layer and a sigmoid: the
probability of leaving there. The base head is the last exit and always answers.

Training follows the seed's surrogate for the gate level of its bi-level problem. Each training
sample's cost of leaving at exit l is ``CE(target, p_l) + λ · IC_l / IC_L`` (IC = FLOPs to reach l);
with ``l*`` the cheapest exit, gate n's binary target is ``1[n ≥ l*]``, and each gate is fitted with
class-balanced binary cross-entropy. Simplification, said plainly: the exits are frozen (the issue
asks for gates on frozen exits), so the other level of the bi-level optimisation (re-weighting the
exits' training by where the gates send samples) is not run, and the gates are trained once.
Thresholds on the gate outputs then come from the same policy search as every other method (the
seed's own rule is a threshold of 0.5).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

GATE_T = 2.0  # the temperature of the third statistic (a softened entropy)


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """(B, 4) statistics of (B, K) logits."""
    lg = logits.float()
    p = lg.softmax(-1)
    top2 = p.topk(2, dim=-1).values
    ent = -(p * lg.log_softmax(-1)).sum(-1)
    pt = (lg / GATE_T).softmax(-1)
    ent_t = -(pt * (lg / GATE_T).log_softmax(-1)).sum(-1)
    return torch.stack([top2[:, 0], ent, ent_t, top2[:, 0] - top2[:, 1]], dim=-1)


class Gates(nn.Module):
    """Frozen exits (any method of ``esn/``) plus one gate per exit inside the base."""

    def __init__(self, exits: nn.Module):
        super().__init__()
        self.exits = exits.requires_grad_(False)
        self.uses_saver = exits.uses_saver
        self.gates = nn.ModuleList(nn.Linear(4, 1) for _ in range(exits.num_exits))

    @property
    def num_exits(self) -> int:
        return self.exits.num_exits

    def score(self, n: int, logits: torch.Tensor) -> torch.Tensor:
        """(B,) probability that gate n (1-based stage) lets the sample leave."""
        return torch.sigmoid(self.gates[n - 1](gate_features(logits))).squeeze(-1)

    def offline(self, feats: dict) -> torch.Tensor:
        return self.exits.offline(feats)

    def begin(self, saver_feat, saver_logits):
        return self.exits.begin(saver_feat, saver_logits)

    def step(self, n, stage_out, state):
        return self.exits.step(n, stage_out, state)

    def select(self, state, keep):
        return self.exits.select(state, keep)


def gate_targets(exit_logits: torch.Tensor, base_logits: torch.Tensor, target: torch.Tensor,
                 cost_norm: np.ndarray, lam: float) -> torch.Tensor:
    """(N, B) binary targets for the N gates inside the base.

    ``exit_logits`` (N, B, K) of the exits inside the base, ``base_logits`` (B, K), ``target`` (B,)
    classes or (B, K) probabilities, ``cost_norm`` (N + 1,) FLOPs to reach each exit and the base head
    over the base's FLOPs.
    """
    allg = torch.cat([exit_logits, base_logits[None]]).float()
    ce = torch.stack([nn.functional.cross_entropy(lg, target, reduction="none") for lg in allg])
    cost = ce + lam * torch.as_tensor(cost_norm, dtype=torch.float32)[:, None]
    best = cost.argmin(0)  # l*: the cheapest exit of each sample
    n = torch.arange(len(exit_logits))[:, None]
    return (n >= best[None]).float()


def train_gates(gates: Gates, exit_logits: torch.Tensor, base_logits: torch.Tensor, target: torch.Tensor,
                cost_norm: np.ndarray, lam: float = 1.0, epochs: int = 200, lr: float = 0.05, seed: int = 0) -> Gates:
    """Fit every gate on its surrogate binary task (full batch; the inputs are four numbers per sample)."""
    torch.manual_seed(seed)
    t = gate_targets(exit_logits, base_logits, target, cost_norm, lam)
    feats = [gate_features(lg) for lg in exit_logits]
    opt = torch.optim.Adam(gates.gates.parameters(), lr=lr)
    for _ in range(epochs):
        loss = 0.0
        for n, (f, y) in enumerate(zip(feats, t)):
            pos = y.mean().clamp(1e-3, 1 - 1e-3)  # class balance, as the seed does for imbalanced gates
            w = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
            z = gates.gates[n](f).squeeze(-1)
            loss = loss + nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return gates.eval()


__all__ = ["GATE_T", "gate_features", "Gates", "gate_targets", "train_gates"]
