"""The ESN itself: exits inside the base, behind the saver (see `esn.model`)."""
from __future__ import annotations

from . import Context, ExitMethod, register_method


@register_method("esn")
def train(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training the ESN")
    return {"saver + ESN": ExitMethod(ctx.esn(ctx.settings.label_free))}


__all__ = ["train"]
