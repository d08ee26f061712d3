"""The exit methods ``exits compare`` trains beside the ESN, one module per method family in
this package, each registered beside itself.

A family is a function registered with ``@register_method(name)`` in its own module (its name
is the module's, ``-`` for ``_``). It takes the shared `Context` (pair, feature cache, targets,
settings) and returns its trained rows, each an `ExitMethod` carrying everything the comparison
needs to treat it differently: whether its exits are always temperature-calibrated, and its own
exit rule if it has one. Nothing downstream looks at a row's display name. Adding a method is
adding one file here.

The names are read from this folder, so the command line lists `FAMILIES` without importing
torch; a family's module is imported when it is first asked for.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tinysaver.registry import Registry

if TYPE_CHECKING:
    from ..settings import CompareSettings


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

        from ..label_free import soft_targets

        lf = self.settings.label_free if label_free is None else label_free
        return soft_targets(self.cache["base_logits"]) if lf else torch.as_tensor(self.train.labels)

    def fit(self, **over) -> dict:
        s = self.settings
        return {"epochs": s.epochs, "lr": s.lr, "seed": s.seed, **over}

    def esn(self, label_free: bool):
        from ..train import TrainSettings, train_esn

        s = self.settings
        settings = TrainSettings.from_yaml(None, **{"epochs": s.epochs, "seed": s.seed, **s.esn,
                                                    "label_free": label_free})
        return train_esn(self.pair, self.train, settings, log=lambda m: None, progress=False, cache=self.cache)

    def sdn(self, label_free: bool = False):
        """SDN exits on the frozen base, trained once per target and shared."""
        key = ("sdn", label_free or self.settings.label_free)
        if key not in self.shared:
            import torch

            from ..fit import fit_exits
            from ..sdn import SDN

            torch.manual_seed(self.settings.seed)  # every method starts from the same seed, whatever ran before
            m = SDN(self.dims, self.classes)
            fit_exits(lambda b: m(b["stage_feats"]), m.parameters(), self.cache, self.target(key[1]), **self.fit())
            self.shared[key] = m.eval()
        return self.shared[key]


def family_names() -> tuple[str, ...]:
    """The families, the ESN first and its rivals by name (the comparison table's row order)."""
    found = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return tuple(sorted(found, key=lambda n: n != "esn"))


# ``train(ctx) -> {row name: ExitMethod}``, registered with @register_method(family) in the family's own module
EXIT_METHODS: Registry[Callable[[Context], dict[str, ExitMethod]]] = Registry(
    "exit method", listed=family_names,
    load=lambda name: importlib.import_module(f"{__name__}.{name.replace('-', '_')}"))
register_method, registered, trainer = EXIT_METHODS.register, EXIT_METHODS.names, EXIT_METHODS.get

FAMILIES = registered()  # the built-in families, the command line's default

__all__ = ["ExitMethod", "Context", "EXIT_METHODS", "register_method", "registered", "trainer", "family_names",
           "FAMILIES"]
