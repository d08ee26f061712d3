"""Zero Time Waste (seed ``004_*``): cascade connections and geometric ensembling of the exits.

- **Cascade connections.** Exit n's linear layer also reads exit n−1's logits, layer-normalised and
  with the gradient stopped (the seed's appendix C.3), so an exit never sees a later stage and later
  losses never pull on earlier exits.
- **Geometric ensembling.** Exit n answers ``q_n ∝ b_n ⊙ Π_{j≤n} p_j^{w_nj}`` with ``w_nj ≥ 0`` and
  per-class ``b_n ≥ 0`` (kept positive as ``exp`` of free parameters). It is trained after the
  classifiers, with them frozen, on the NLL of every ``q_n``. At initialisation ``w_nn = 1``, the
  other weights are small and ``b_n = 1``, so a one-exit ensemble equals that exit.

``cascade`` and ``ensemble`` switch the two parts independently: both off is SDN with this module's
heads; the seed's appendix C.1 ablations are one of them on.
"""
from __future__ import annotations

import torch
from torch import nn

from .staged import pooled

OFF_DIAGONAL_INIT = -3.0  # log w of earlier exits at the start: w ≈ 0.05, trust the newest exit first


class ZTW(nn.Module):
    uses_saver = False

    def __init__(self, stage_dims: tuple[int, ...], num_classes: int, cascade: bool = True, ensemble: bool = True):
        super().__init__()
        self.cascade, self.ensemble = cascade, ensemble
        k = num_classes
        self.heads = nn.ModuleList(nn.Linear(c + (k if cascade and n else 0), k) for n, c in enumerate(stage_dims))
        self.norms = nn.ModuleList(nn.LayerNorm(k) for _ in stage_dims[1:]) if cascade else nn.ModuleList()
        n = len(stage_dims)
        log_w = torch.full((n, n), OFF_DIAGONAL_INIT)
        log_w.fill_diagonal_(0.0)
        self.log_w = nn.Parameter(log_w)  # row n: weights of exits 0..n (entries above the diagonal unused)
        self.log_b = nn.Parameter(torch.zeros(n, k))

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def classifier_params(self):
        return [*self.heads.parameters(), *self.norms.parameters()]

    def ensemble_params(self):
        return [self.log_w, self.log_b]

    def ic_step(self, n: int, feat: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits of classifier n (1-based) from its (B, C) pooled feature and exit n−1's logits."""
        if self.cascade and n > 1:
            feat = torch.cat([feat, self.norms[n - 2](prev.detach())], dim=-1)
        return self.heads[n - 1](feat)

    def combine(self, n: int, log_probs: list[torch.Tensor]) -> torch.Tensor:
        """Geometric ensemble of exits 1..n from their log-probabilities; returns logits (log q_n + c)."""
        w = self.log_w[n - 1, :n].exp()
        return self.log_b[n - 1] + sum(w[j] * lp for j, lp in enumerate(log_probs))

    def forward(self, stage_feats: list[torch.Tensor], ensembled: bool | None = None) -> torch.Tensor:
        """(N, B, K) exit logits; ``ensembled=False`` gives the classifiers alone (used in training)."""
        ens = self.ensemble if ensembled is None else ensembled
        prev, lps, out = None, [], []
        for n, f in enumerate(stage_feats, start=1):
            prev = self.ic_step(n, f if f.dim() == 2 else pooled(f), prev)
            lps.append(prev.float().log_softmax(-1))
            out.append(self.combine(n, lps) if ens else prev)
        return torch.stack(out)

    def offline(self, feats: dict) -> torch.Tensor:
        return self(feats["stage_feats"])

    def begin(self, saver_feat, saver_logits):
        return {"prev": None, "lps": []}

    def step(self, n: int, stage_out: torch.Tensor, state: dict):
        prev = self.ic_step(n, pooled(stage_out), state["prev"])
        lps = [*state["lps"], prev.float().log_softmax(-1)]
        return (self.combine(n, lps) if self.ensemble else prev), {"prev": prev, "lps": lps}

    def select(self, state: dict, keep):
        return {"prev": None if state["prev"] is None else state["prev"][keep], "lps": [lp[keep] for lp in state["lps"]]}


__all__ = ["OFF_DIAGONAL_INIT", "ZTW"]
