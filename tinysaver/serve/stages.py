"""What a replica loads, in either layout: the plan's stages, built by its factory on the
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


def model_stages(plan, device: str = "cpu", only: list[int] | None = None) -> dict:
    """{stage index: engine stage} of a saver → … → base plan: each model from the zoo on its
    backend (the export cache is the one ``infer`` uses, next to the checkpoint)."""
    from ..runtimes import make_runner
    from ..zoo import load_zoo

    zoo = load_zoo(plan.stages.zoo_dir)
    out = {}
    for i in (range(len(plan.stages.keys)) if only is None else only):
        model = zoo.load_model(plan.stages.keys[i], device=device,
                               accept_preprocess_change=plan.stages.accept_preprocess_change)
        model.module.eval()
        out[i] = ModelStage(model, make_runner(model, plan.stages.backends[i]), plan.stages.temperatures[i], device)
    return out


def load_stages(plan, device: str = "cpu", only: list[int] | None = None) -> dict:
    """The plan's factory ("module:function") called on this replica: {index: engine stage}."""
    module, _, name = plan.factory.partition(":")
    return getattr(import_module(module), name)(plan, device, only)


__all__ = ["load_stages", "model_stages", "stage_device"]
