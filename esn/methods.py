"""The exit methods ``exits compare`` trains beside the ESN, each registered once.

A method family is a function registered with ``@register_method(name)``. It takes the shared
`Context` (pair, feature cache, targets, settings) and returns its trained rows, each an
`ExitMethod` carrying everything the comparison needs to treat it differently: whether its
exits are always temperature-calibrated, and its own exit rule if it has one. Nothing downstream
looks at a row's display name. Adding a method is one function here.

This module imports no torch at import time, so the command line reads `FAMILIES` cheaply.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tinysaver.registry import Registry

if TYPE_CHECKING:
    from .settings import CompareSettings


@dataclass
class ExitMethod:
    """One trained row of the comparison.

    ``module``: the exit module (``offline``/``begin``/``step``/``select``, see `esn.exits`).
    ``calibrated``: its exits are always temperature-calibrated on calib before thresholds are
    chosen. ``own_rule(calib_outputs, settings) -> thresholds``: the method's own exit rule, when
    it has one besides the shared policy search."""

    module: Any
    calibrated: bool = False
    own_rule: Callable | None = None


@dataclass
class Context:
    """What every family trains from: the pair, the training split and its feature cache."""

    pair: Any
    train: Any
    cache: dict
    settings: "CompareSettings"
    log: Callable = print
    shared: dict = field(default_factory=dict)  # trained parts one family lends another (gates reuse the SDN)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.pair.base_staged.stage_channels(self.pair.base.preprocess.input_size))

    @property
    def classes(self) -> int:
        return self.pair.base.num_classes

    def target(self, label_free: bool | None = None):
        import torch

        from .label_free import soft_targets

        lf = self.settings.label_free if label_free is None else label_free
        return soft_targets(self.cache["base_logits"]) if lf else torch.as_tensor(self.train.labels)

    def fit(self, **over) -> dict:
        s = self.settings
        return {"epochs": s.epochs, "lr": s.lr, "seed": s.seed, **over}

    def esn(self, label_free: bool):
        from .train import TrainSettings, train_esn

        s = self.settings
        settings = TrainSettings.from_yaml(None, **{"epochs": s.epochs, "seed": s.seed, **s.esn,
                                                    "label_free": label_free})
        return train_esn(self.pair, self.train, settings, log=lambda m: None, progress=False, cache=self.cache)

    def sdn(self, label_free: bool = False):
        """SDN exits on the frozen base, trained once per target and shared."""
        key = ("sdn", label_free or self.settings.label_free)
        if key not in self.shared:
            import torch

            from .fit import fit_exits
            from .sdn import SDN

            torch.manual_seed(self.settings.seed)  # every method starts from the same seed, whatever ran before
            m = SDN(self.dims, self.classes)
            fit_exits(lambda b: m(b["stage_feats"]), m.parameters(), self.cache, self.target(key[1]), **self.fit())
            self.shared[key] = m.eval()
        return self.shared[key]


# ``train(ctx) -> {row name: ExitMethod}``, registered with @register_method(family); the table keeps this order
EXIT_METHODS: Registry[Callable[[Context], dict[str, ExitMethod]]] = Registry("exit method")
register_method, registered, trainer = EXIT_METHODS.register, EXIT_METHODS.names, EXIT_METHODS.get


@register_method("esn")
def _esn(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training the ESN")
    return {"saver + ESN": ExitMethod(ctx.esn(ctx.settings.label_free))}


@register_method("sdn")
def _sdn(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training SDN exits")
    return {"SDN": ExitMethod(ctx.sdn())}


@register_method("ztw")
def _ztw(ctx: Context) -> dict[str, ExitMethod]:
    import torch

    from .fit import fit_exits
    from .ztw import ZTW

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


def _leave_when_the_gate_says(cal: dict, settings) -> list[float]:
    return [0.5] * cal["confs"].shape[0]  # the seed's rule: a gate score ≥ 0.5 leaves


@register_method("gates")
def _gates(ctx: Context) -> dict[str, ExitMethod]:
    import torch

    from .exits import exit_flops
    from .gates import Gates, train_gates

    sdn = ctx.sdn()
    ctx.log("training gates on the frozen SDN exits")
    torch.manual_seed(ctx.settings.seed)
    g = Gates(copy.deepcopy(sdn))
    flops = exit_flops(ctx.pair, g.exits)
    with torch.inference_mode():
        ex = g.exits.offline(ctx.cache)
    train_gates(g, ex, ctx.cache["base_logits"], ctx.target(), flops["per_exit"] / flops["base_total"],
                lam=ctx.settings.gate_lambda, seed=ctx.settings.seed)
    return {f"gates (λ={ctx.settings.gate_lambda:g})": ExitMethod(g, own_rule=_leave_when_the_gate_says)}


def _tolerance_rule(cal: dict, settings) -> list[float]:
    from .label_free import tolerance_thresholds

    return tolerance_thresholds(cal["preds"], cal["confs"], cal["base_pred"], settings.lf_tolerance)


@register_method("label-free")
def _label_free(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training label-free SDN exits and a label-free ESN")
    # seed 001's label-free exits are always temperature-calibrated, and keep its T/2^n rule
    return {"label-free SDN": ExitMethod(ctx.sdn(label_free=True), calibrated=True, own_rule=_tolerance_rule),
            "label-free saver + ESN": ExitMethod(ctx.esn(True), calibrated=True, own_rule=_tolerance_rule)}


FAMILIES = registered()  # the built-in families, the command line's default

__all__ = ["ExitMethod", "Context", "register_method", "registered", "trainer", "FAMILIES"]
