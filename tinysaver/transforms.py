"""Per-model preprocessing applied to already-decoded uint8 tensors.

The image is decoded once (see `tinysaver.data`); each model then derives its own input
from that tensor with `prepare_batch`, following timm's eval transform: resize the shorter
side to ``floor(size / crop_pct)``, centre-crop, scale to [0, 1] and normalise.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .errors import UsageError
from .models import Preprocess

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


def _channels(img: torch.Tensor, c: int) -> torch.Tensor:
    """Match channel count: grey→RGB repeats, RGB→grey uses ITU-R 601 luma (as PIL's 'L')."""
    have = img.shape[-3]
    if have == c:
        return img
    if have == 1 and c == 3:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
    if have == 3 and c == 1:
        return F.rgb_to_grayscale(img, num_output_channels=1)
    if have == 4:
        return _channels(img[..., :3, :, :], c)
    raise UsageError(f"cannot convert a {have}-channel image to {c} channels")


def _resize_crop(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    size = pre.resized_size(*img.shape[-2:])
    if size is not None:
        img = F.resize(img, list(size), interpolation=_INTERP.get(pre.interpolation, InterpolationMode.BICUBIC),
                       antialias=True)
        img = F.center_crop(img, list(pre.input_size[1:]))
    return img


def prepare_batch(images: Sequence[torch.Tensor] | torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 images, a list of (C, H, W) or one (N, C, H, W) tensor → float (N, C', H', W') model input."""
    c = pre.input_size[0]
    if isinstance(images, torch.Tensor):
        batch = _resize_crop(_channels(images, c), pre)
    else:
        if len(images) == 0:
            raise UsageError("cannot prepare an empty batch")
        batch = torch.stack([_resize_crop(_channels(im, c), pre) for im in images])
    x = batch.float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


__all__ = ["prepare_batch"]
