"""torch.compile with a dynamic batch axis."""
from __future__ import annotations

import time

import torch

from ..models import model_device
from . import Runner, register_backend


@register_backend("compile", torch_modules=True)
def build(model, cache_dir=None, threads=None, spin=False) -> Runner:
    module = model.module.eval()
    compiled = torch.compile(module, dynamic=True)
    # torch.compile works on first call; compile now, so that the time is reported as export time
    # and no request pays it. Batch 1 is specialised apart from the dynamic batch axis, and batch
    # shrinking reaches it often, so both shapes are compiled.
    device = model_device(module)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for n in (2, 1):
            compiled(torch.zeros(n, *model.preprocess.input_size, device=device))
    return Runner(model.key, "compile", compiled, export_s=time.perf_counter() - t0, threads=torch.get_num_threads())


__all__ = ["build"]
