"""SDN: one plain classifier per stage of the frozen base (see `esn.sdn`)."""
from __future__ import annotations

from . import Context, ExitMethod, register_method


@register_method("sdn")
def train(ctx: Context) -> dict[str, ExitMethod]:
    ctx.log("training SDN exits")
    return {"SDN": ExitMethod(ctx.sdn())}


__all__ = ["train"]
