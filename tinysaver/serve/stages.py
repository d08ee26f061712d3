"""What a replica loads, in either layout: the spec's stages, built by its factory on the
replica's device (`tinysaver.serve.fused` runs them all; `tinysaver.serve.per_stage` one each).
Nothing here imports Ray.
"""
from __future__ import annotations

from importlib import import_module

from ..engine import ModelStage
from ..errors import DeviceError


def stage_device(num_gpus: float) -> str:
    """Where a replica runs its models: on the GPU Ray gave it (``num_gpus`` > 0), else the CPU."""
    if num_gpus <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("this stage was given --num-gpus > 0, but its replica sees no CUDA device")
    return "cuda"


def model_stages(spec, device: str = "cpu", only: list[int] | None = None) -> dict:
    """{stage index: engine stage} of a saver → … → base spec: each model from the zoo on its
    backend (the export cache is the one ``infer`` uses, next to the checkpoint)."""
    from ..runtimes import make_runner
    from ..zoo import load_zoo

    zoo = load_zoo(spec.stages.zoo_dir)
    out = {}
    for i in (range(len(spec.stages.keys)) if only is None else only):
        model = zoo.load_model(spec.stages.keys[i], device=device,
                               accept_preprocess_change=spec.stages.accept_preprocess_change)
        model.module.eval()
        out[i] = ModelStage(model, make_runner(model, spec.stages.backends[i]), spec.stages.temperatures[i], device)
    return out


def load_stages(spec, device: str = "cpu", only: list[int] | None = None) -> dict:
    """The spec's factory ("module:function") called on this replica: {index: engine stage}."""
    module, _, name = spec.factory.partition(":")
    return getattr(import_module(module), name)(spec, device, only)


__all__ = ["load_stages", "model_stages", "stage_device"]
