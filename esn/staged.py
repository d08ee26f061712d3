"""Run a timm classifier stage by stage, so compute after an early exit is really skipped.

The same split serves ESN training (features) and dynamic inference, so both see identical
intermediate tensors. ``tests/test_esn.py`` checks the split against timm's own
``forward_intermediates`` and against the plain forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tinysaver.errors import UsageError


@dataclass
class StagedModel:
    """``stem`` → ``stages[0]`` → … → ``stages[-1]`` → ``tail`` equals ``model(x)``.

    Stage outputs are (B, C, H, W) for CNNs and (B, tokens, C) for ViTs.
    """

    model: nn.Module
    stem: Callable[[torch.Tensor], torch.Tensor]
    stages: list[nn.Module]
    tail: Callable[[torch.Tensor], torch.Tensor]

    def stage_channels(self, input_size: tuple[int, int, int]) -> list[int]:
        with torch.inference_mode():
            x = self.stem(torch.zeros(1, *input_size))
            out = []
            for s in self.stages:
                x = s(x)
                out.append(x.shape[1] if x.dim() == 4 else x.shape[-1])
        return out

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = []
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats, self.tail(x)


def _flatten(seqs: list[nn.Module], granularity: str) -> list[nn.Module]:
    if granularity == "stage":
        return seqs
    if granularity == "block":
        out: list[nn.Module] = []
        for s in seqs:
            out.extend(list(s.children()) if isinstance(s, nn.Sequential) else [s])
        return out
    raise UsageError(f"granularity must be 'stage' or 'block', got {granularity!r}")


def staged(model: nn.Module, granularity: str = "stage") -> StagedModel:
    """Split a timm ResNet, EfficientNet/MobileNetV3/LCNet, RegNet, ConvNeXt or ViT into stages."""
    m = model
    name = type(m).__name__
    if name == "ResNet":
        def stem(x): return m.maxpool(m.act1(m.bn1(m.conv1(x))))
        stages = [m.layer1, m.layer2, m.layer3, m.layer4]

        def tail(x): return m.forward_head(x)
    elif name == "EfficientNet":
        def stem(x): return m.bn1(m.conv_stem(x))
        stages = list(m.blocks)

        def tail(x): return m.forward_head(m.bn2(m.conv_head(x)))
    elif name == "MobileNetV3":
        def stem(x): return m.bn1(m.conv_stem(x))
        stages = list(m.blocks)

        def tail(x): return m.forward_head(x)
    elif name == "RegNet":
        def stem(x): return m.stem(x)
        stages = [m.s1, m.s2, m.s3, m.s4]

        def tail(x): return m.forward_head(m.final_conv(x))
    elif name == "ConvNeXt":
        def stem(x): return m.stem(x)
        stages = list(m.stages)

        def tail(x): return m.forward_head(m.norm_pre(x))
    elif name == "VisionTransformer":
        def stem(x): return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        stages = list(m.blocks)

        def tail(x): return m.forward_head(m.norm(x))
    else:
        raise UsageError(f"no stage split for {name}; supported: ResNet, EfficientNet, MobileNetV3, RegNet, "
                         "ConvNeXt, VisionTransformer")
    return StagedModel(m, stem, _flatten(stages, granularity), tail)


def pooled(feat: torch.Tensor) -> torch.Tensor:
    """Global average pool: (B, C, H, W) → (B, C); (B, tokens, C) → (B, C)."""
    return feat.mean(dim=(2, 3)) if feat.dim() == 4 else feat.mean(dim=1)


def saver_outputs(saver: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits feature (B, D), logits (B, K)) of a timm saver."""
    f = saver.forward_features(x)
    return saver.forward_head(f, pre_logits=True), saver.forward_head(f)


__all__ = ["StagedModel", "staged", "pooled", "saver_outputs"]
