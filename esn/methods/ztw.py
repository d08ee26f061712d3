"""Zero-time waste: cascaded exit classifiers and an ensemble of them (see `esn.ztw`), with the
two ablations the seed reports: connections only and ensembling only."""
from __future__ import annotations

import copy

import torch

from ..fit import fit_exits
from ..ztw import ZTW
from . import Context, ExitMethod, register_method


@register_method("ztw")
def train(ctx: Context) -> dict[str, ExitMethod]:
    out = {}
    for name, cascade in (("ZTW", True), ("ZTW (ensembling only)", False)):
        ctx.log(f"training {name}")
        torch.manual_seed(ctx.settings.seed)
        m = ZTW(ctx.dims, ctx.classes, cascade=cascade, ensemble=True)
        fit_exits(lambda b: m(b["stage_feats"], ensembled=False), m.classifier_params(), ctx.cache, ctx.target(),
                  **ctx.fit())
        fit_exits(lambda b: m(b["stage_feats"], ensembled=True), m.ensemble_params(), ctx.cache, ctx.target(),
                  **ctx.fit(lr=ctx.settings.ensemble_lr))
        out[name] = ExitMethod(m.eval())
        if cascade:  # the same trained classifiers without the ensemble
            conn = copy.deepcopy(m)
            conn.ensemble = False
            out["ZTW (connections only)"] = ExitMethod(conn)
    return {k: out[k] for k in ("ZTW", "ZTW (connections only)", "ZTW (ensembling only)")}


__all__ = ["train"]
