"""The stages a replica runs: built from the plan by its factory, on the replica's device.

A fused replica runs all of them through `tinysaver.engine.run`; a per-stage replica runs
one, on the (image, carry) items its requests bring (``ItemStage``). Nothing here imports Ray.
"""
from __future__ import annotations

from importlib import import_module

from ..engine import ModelStage, carry_rows, carry_stack
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


class ItemStage:
    """One engine stage on a list of (image, carry) items, one item per request: the carries are
    stacked into a batch and the carry handed on is split back into one per request."""

    def __init__(self, stage, device: str = "cpu"):
        self.stage, self.device = stage, device
        self.name = getattr(stage, "name", "stage")

    def __call__(self, items: list) -> list[tuple[int, float, object]]:
        images = [img for img, _ in items]
        carry = carry_stack([c for _, c in items], self.device)
        pred, conf, out = self.stage(images if getattr(self.stage, "needs_images", True) else None, carry)
        rows = carry_rows(out, len(items))
        return [(int(p), float(c), r) for p, c, r in zip(pred.tolist(), conf.float().tolist(), rows)]


__all__ = ["ItemStage", "load_stages", "model_stages", "stage_device"]
