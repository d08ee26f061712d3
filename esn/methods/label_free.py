"""Label-free exits: SDN exits and an ESN trained on the base's soft outputs instead of labels,
always temperature-calibrated, with seed 001's T/2^n tolerance rule (see `esn.label_free`)."""
from __future__ import annotations

from ..label_free import tolerance_thresholds
from . import Context, ExitMethod, register_method


def tolerance_rule(cal: dict, settings) -> list[float]:
    return tolerance_thresholds(cal["preds"], cal["confs"], cal["base_pred"], settings.lf_tolerance)


@register_method("label-free")
def train(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training label-free SDN exits and a label-free ESN")
    return {"label-free SDN": ExitMethod(ctx.sdn(label_free=True), calibrated=True, own_rule=tolerance_rule),
            "label-free saver + ESN": ExitMethod(ctx.esn(True), calibrated=True, own_rule=tolerance_rule)}


__all__ = ["train", "tolerance_rule"]
