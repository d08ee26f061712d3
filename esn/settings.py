"""The settings of ``exits compare`` and ``exits regimes``, and the names they accept.

Plain dataclasses with no torch in them, so the command line can read their defaults without
loading a model library.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tinysaver.errors import UsageError

REGIMES = ("disjoint", "joint", "mixed")


@dataclass
class CompareSettings:
    epochs: int = 10               # exit heads and the ESN
    lr: float = 1e-3               # SDN/ZTW classifiers (the ESN keeps its Table 7 settings)
    ensemble_lr: float = 1e-2
    gate_lambda: float = 1.0       # λ of the gates' cost term (seed 003 sweeps 0.01–10)
    lf_tolerance: float = 1.0      # T of the label-free T/2^n rule, in accuracy points
    label_free: bool = False       # train every method on the base's outputs, never on labels
    calibrate: str | None = None   # "temperature": fit T per exit on calib before any threshold
    alpha: float = 0.1             # conformal sets at coverage 1 − α
    wallclock_images: int = 256
    train_limit: int | None = None
    seed: int = 0
    esn: dict = field(default_factory=dict)  # TrainSettings overrides

    def __post_init__(self) -> None:
        from tinysaver.splits import check_calibration

        check_calibration(self.calibrate)
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.epochs < 1 or self.wallclock_images < 0:
            raise UsageError("epochs must be ≥ 1 and wallclock_images ≥ 0")


@dataclass
class RegimeSettings:
    joint_samples: int = 120_000   # the zoo trained resnet10t on 120k samples (fashion-mnist-train.yaml)
    joint_lr: float = 3e-3
    mixed_samples: int = 50_000
    mixed_lr: float = 5e-4
    heads_epochs: int = 10         # disjoint: exits on the frozen base
    heads_lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.joint_samples, self.mixed_samples, self.heads_epochs, self.batch_size) < 1:
            raise UsageError("sample budgets, epochs and batch size must be ≥ 1")


__all__ = ["REGIMES", "CompareSettings", "RegimeSettings"]
