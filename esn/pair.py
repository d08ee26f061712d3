"""The frozen saver and base an ESN, or any exit method, is built on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinysaver.errors import UsageError

from .staged import StagedModel, staged


@dataclass
class Pair:
    """The frozen saver and base of an ESN, built from their zoo entries."""

    zoo: str
    saver_key: str
    base_key: str
    saver: Any  # LoadedModel
    base: Any   # LoadedModel
    base_staged: StagedModel = field(repr=False)

    @classmethod
    def from_zoo(cls, zoo, saver: str, base: str, granularity: str = "stage") -> "Pair":
        if saver == base:
            raise UsageError(f"a model cannot be its own saver: {saver!r} is the base; pick a cheaper model as --saver")
        s = zoo.load_model(saver)
        b = zoo.load_model(base)
        if s.num_classes != b.num_classes:
            raise UsageError(f"saver {saver!r} and base {base!r} predict different class spaces")
        for m in (s, b):
            m.module.eval().requires_grad_(False)
        return cls(zoo.name, saver, base, s, b, staged(b.module, granularity))

    @classmethod
    def of(cls, saver, base, base_staged: StagedModel, zoo: str = "") -> "Pair":
        """A pair of models already loaded (``saver`` may be None: exits inside the base only)."""
        return cls(zoo, saver.key if saver is not None else "", base.key, saver, base, base_staged)


__all__ = ["Pair"]
