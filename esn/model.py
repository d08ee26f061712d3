"""The Exit Sequence Network (TinySaver paper, appendix 6.3–6.4).

Token 0 embeds the saver's pre-logits feature; token n (n ≥ 1) embeds the base's n-th stage
output, each through global average pooling and a linear layer to ``dim``. A causal transformer
("the bus") lets token n attend to tokens ≤ n only, so exit n can run as soon as base stage n is
done. Exit n outputs ``saver_logits + head_n(bus(token)_n)`` with every head initialised to zero,
so at initialisation each exit equals the saver.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .staged import pooled
from tinysaver.errors import UsageError
from tinysaver.policy import confidence


@dataclass(frozen=True)
class ESNConfig:
    saver_dim: int
    stage_dims: tuple[int, ...]
    num_classes: int
    dim: int = 128
    num_layers: int = 1
    num_heads: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers not in (0, 1, 2, 3):
            raise UsageError(f"num_layers must be 0, 1, 2 or 3, got {self.num_layers}")
        if self.dim < 1 or not self.stage_dims:
            raise UsageError("dim must be ≥ 1 and the base needs at least one stage")

    @property
    def heads(self) -> int:
        """8 heads where ``dim`` allows, else the largest divisor of ``dim`` below 8."""
        return next(h for h in range(min(self.num_heads, self.dim), 0, -1) if self.dim % h == 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_dims"] = list(self.stage_dims)
        return d


class ExitSequenceNetwork(nn.Module):
    def __init__(self, cfg: ESNConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_saver = nn.Linear(cfg.saver_dim, cfg.dim)
        self.embed_stages = nn.ModuleList(nn.Linear(c, cfg.dim) for c in cfg.stage_dims)
        self.pos = nn.Parameter(torch.zeros(1 + len(cfg.stage_dims), cfg.dim))
        if cfg.num_layers:
            layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, dim_feedforward=2 * cfg.dim, dropout=cfg.dropout,
                                               batch_first=True, norm_first=True)
            self.bus: nn.Module | None = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        else:
            self.bus = None
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.num_classes) for _ in cfg.stage_dims)
        for h in self.heads:  # zero init: every exit starts as the saver
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def embed(self, saver_feat: torch.Tensor, stage_feats: list[torch.Tensor]) -> torch.Tensor:
        """Tokens (B, 1 + len(stage_feats), dim). Features may be pooled (B, C) or raw maps."""
        toks = [self.embed_saver(saver_feat) + self.pos[0]]
        toks += [self.embed_stage(n, f) for n, f in enumerate(stage_feats, start=1)]
        return torch.stack(toks, dim=1)

    def embed_stage(self, n: int, feat: torch.Tensor) -> torch.Tensor:
        """Token (B, dim) of base stage ``n`` (1-based) from its pooled (B, C) feature or its raw
        map ((B, C, H, W) or ViT tokens (B, T, C)); dynamic inference adds tokens one at a time."""
        return self.embed_stages[n - 1](feat if feat.dim() == 2 else pooled(feat)) + self.pos[n]

    def run_bus(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.bus is None:
            return tokens
        n = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device, dtype=tokens.dtype)
        return self.bus(tokens, mask=mask, is_causal=True)

    def forward(self, saver_feat: torch.Tensor, stage_feats: list[torch.Tensor],
                saver_logits: torch.Tensor) -> torch.Tensor:
        """Exit logits (num_exits_given, B, K): one per given stage feature, in order."""
        out = self.run_bus(self.embed(saver_feat, stage_feats))
        return torch.stack([saver_logits + self.heads[n](out[:, n + 1]) for n in range(len(stage_feats))])

    def exit_logits(self, tokens: torch.Tensor, n: int, saver_logits: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``n`` (1-based stage index) from the first n + 1 tokens."""
        out = self.run_bus(tokens[:, : n + 1])
        return saver_logits + self.heads[n - 1](out[:, n])

    # -- the exit-method protocol of esn.exits (the saver runs first and is exit 0)
    uses_saver = True

    def offline(self, feats: dict) -> torch.Tensor:
        return self(feats["saver_feat"], feats["stage_feats"], feats["saver_logits"])

    def begin(self, saver_feat: torch.Tensor, saver_logits: torch.Tensor) -> dict:
        return {"tokens": self.embed(saver_feat, []), "saver_logits": saver_logits}

    def step(self, n: int, stage_out: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        tokens = torch.cat([state["tokens"], self.embed_stage(n, stage_out)[:, None]], dim=1)
        return self.exit_logits(tokens, n, state["saver_logits"]), {**state, "tokens": tokens}

    def select(self, state: dict, keep: torch.Tensor) -> dict:
        return {k: v[keep] for k, v in state.items()}


def esn_loss(exit_logits: torch.Tensor, target: torch.Tensor, saver_logits: torch.Tensor) -> torch.Tensor:
    """Σ_n mean_m 2·(1 − max softmax of the saver on m) · CE(exit_n(m), y_m).

    ``exit_logits`` is (N, B, K); ``target`` is (B,) class indices or (B, K) soft targets (mixup).
    The paper sums over samples; we average so the learning rate does not depend on batch size.
    """
    w = 2.0 * (1.0 - confidence(saver_logits.detach())[0])
    total = exit_logits.new_zeros(())
    for logits in exit_logits:
        ce = nn.functional.cross_entropy(logits.float(), target, reduction="none")
        total = total + (w * ce).mean()
    return total


__all__ = ["ESNConfig", "ExitSequenceNetwork", "esn_loss"]
