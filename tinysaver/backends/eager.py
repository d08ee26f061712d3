"""Eager PyTorch: the module itself, the reference every other backend is compared with."""
from __future__ import annotations

import torch

from . import Runner, register_backend


@register_backend("eager", torch_modules=True, devices=("cpu", "cuda"))
def build(model, cache_dir=None, threads=None, spin=False) -> Runner:
    return Runner(model.key, "eager", model.module.eval(), threads=torch.get_num_threads())


__all__ = ["build"]
