"""Learned exit gates on the frozen SDN exits (see `esn.gates`), with the seed's own rule."""
from __future__ import annotations

import copy

import torch

from ..exits import exit_flops
from ..gates import Gates, train_gates
from . import Context, ExitMethod, register_method


def leave_when_the_gate_says(cal: dict, settings) -> list[float]:
    return [0.5] * cal["confs"].shape[0]  # the seed's rule: a gate score ≥ 0.5 leaves


@register_method("gates")
def train(ctx: Context) -> dict[str, ExitMethod]:
    sdn = ctx.sdn()
    ctx.log("training gates on the frozen SDN exits")
    torch.manual_seed(ctx.settings.seed)
    g = Gates(copy.deepcopy(sdn))
    flops = exit_flops(ctx.pair, g.exits)
    with torch.inference_mode():
        ex = g.exits.offline(ctx.cache)
    train_gates(g, ex, ctx.cache["base_logits"], ctx.target(), flops["per_exit"] / flops["base_total"],
                lam=ctx.settings.gate_lambda, seed=ctx.settings.seed)
    return {f"gates (λ={ctx.settings.gate_lambda:g})": ExitMethod(g, own_rule=leave_when_the_gate_says)}


__all__ = ["train", "leave_when_the_gate_says"]
