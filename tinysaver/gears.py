"""Gears: a saver → base cascade's certified operating points, from the zero-loss policy down to the
cheapest one within a loss budget, and the rule that picks one from the load a replica sees.

**The plan** (`gear_plan`, computed at selection time). The budget is ``max_loss`` ε accuracy
points at level δ. It is cut into ``levels`` steps ε_g = ε·g/levels, and for each the guaranteed
criterion (`tinysaver.criteria`, tests in fixed sequence on a fixed threshold grid) runs at δ/levels
over the one saver: its cheapest certified threshold t_g is gear g. Gear 0 is the zero-loss
policy (criterion ``zero``), its threshold raised to the next point of the same grid; it is kept only
when that point is at or above t_1, so that the level-1 test has certified it too (a fixed-sequence
test certifies every grid point it passed, which are those above its last). With probability at
least 1 − δ (Bonferroni over the levels), every gear g at once has an expected loss against the
base of at most ε_g, gear 0 of at most ε_1. A mixture of gears, in any proportion chosen by any
rule, then loses at most ε in expectation: the loss of a sample answered in gear g has mean at most
ε_g ≤ ε, whichever gear was chosen for it, as long as the choice does not look at the sample's own
outcome (the load does not) and the samples are exchangeable with the calibration samples.

**The switch** (`GearBox`): given what one replica sees (images waiting, the oldest one's age, how
many images per second its gear serves, how many arrive), it predicts each gear's wait from its
cost and moves to a cheaper gear only when the latency target is at risk or the arrivals outrun
the gear, and back only when the dearer gear would keep up with room to spare for a while
(hysteresis), so that it does not flap. No clock is read here: the caller passes what it measured,
and the tests drive it with a simulated queue.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from .criteria import GUARANTEE_GRID
from .errors import SelectionError
from .policy import GEARS_SCHEMA_VERSION, Selection

LEVELS = 4  # loss levels the budget is cut into (δ is split over them)
ZERO_KEPT = "gear 0 is the zero-loss policy"  # how a plan's message starts when its gear 0 is that policy


@dataclass(frozen=True)
class Gear:
    """One operating point: the saver answers when its confidence is at least ``threshold``.
    ``max_loss``: the accuracy points against the base it is certified at; ``exit_ratio``: the share
    of calibration images the saver answers; ``cost``: expected cost per image (``cost_metric``
    units of the plan)."""

    threshold: float
    max_loss: float
    exit_ratio: float
    cost: float


@dataclass(frozen=True)
class GearPlan:
    """Gears of ``saver`` → ``base``, most expensive (gear 0, the zero-loss policy) first."""

    saver: str
    base: str
    max_loss: float          # ε, accuracy points
    delta: float             # δ, split evenly over ``levels``
    levels: int
    cost_metric: str
    calib_samples: int
    gears: tuple[Gear, ...] = field(default_factory=tuple)
    method: str = "wsr"
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gears", tuple(g if isinstance(g, Gear) else Gear(**g) for g in self.gears))
        if len(self.gears) < 2:
            raise SelectionError("a gear plan has at least two gears (the zero-loss one and a cheaper one)")
        t = [g.threshold for g in self.gears]
        if any(a <= b for a, b in zip(t, t[1:])):
            raise SelectionError(f"a gear plan's thresholds fall from gear to gear, got {t}")
        if not 0 < self.delta < 1 or not np.isfinite(self.max_loss) or self.max_loss <= 0:
            raise SelectionError(f"a gear plan needs ε > 0 points and δ in (0, 1), got {self.max_loss}, {self.delta}")

    @property
    def thresholds(self) -> list[float]:
        return [g.threshold for g in self.gears]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gears"] = [asdict(g) for g in self.gears]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GearPlan":
        return cls(**d)

    def table(self) -> str:
        """The plan as the command prints it."""
        rows = [f"gears of {self.saver} → {self.base}: every gear certified at once with probability ≥ "
                f"{1 - self.delta:g} (δ = {self.delta:g} split over {self.levels} loss levels, {self.method}, "
                f"{self.calib_samples:,} calibration samples)",
                f"{'gear':>4}  {'threshold':>9}  {'exits':>6}  {'cost':>10}  loss ≤ (points)"]
        for i, g in enumerate(self.gears):
            rows.append(f"{i:>4}  {g.threshold:>9.4f}  {100 * g.exit_ratio:5.1f}%  {g.cost:>10.4g}  {g.max_loss:g}"
                        + ("  (the zero-loss policy)" if i == 0 and self.message.startswith(ZERO_KEPT) else ""))
        if self.message:
            rows.append(self.message)
        return "\n".join(rows)


def grid_ceiling(threshold: float) -> float:
    """The smallest point of the guaranteed criterion's grid at or above ``threshold`` (1 above all)."""
    grid = GUARANTEE_GRID[::-1]  # ascending
    i = int(np.searchsorted(grid, threshold, side="left"))
    return float(grid[min(i, len(grid) - 1)])


def gear_plan(zoo, base: str, max_loss: float, delta: float = 0.1, saver: str | None = None, levels: int = LEVELS,
              cost: str = "flops", method: str = "wsr", seed: int = 0) -> GearPlan:
    """The gears of ``base`` within ``max_loss`` accuracy points at level ``delta`` (see the module).

    ``saver``: the saver of the gears (default: the zero-loss selection's). Refused in one line
    (SelectionError) when no saver is selected at zero loss, when the zero-loss policy is a chain,
    or when no gear cheaper than the zero-loss one is certified at ``max_loss``."""
    from .costs import model_cost
    from .selector import SelectorConfig, select
    from .splits import calibration_and_test

    if not np.isfinite(max_loss) or max_loss <= 0 or max_loss > 100:
        raise SelectionError(f"--max-loss is in accuracy points, above 0 and at most 100, got {max_loss}")
    if not isinstance(levels, int) or levels < 1:
        raise SelectionError(f"levels must be a whole number ≥ 1, got {levels!r}")
    zero = select(zoo, base, SelectorConfig(cost=cost, seed=seed), savers=[saver] if saver else None).best
    if not zero.found:
        raise SelectionError(f"no saver of {base!r} is selected at zero loss ({zero.message}): there is no gear "
                             "to start from")
    if len(zero.stages) > 2:
        raise SelectionError("gears are built for a saver → base pair; this zero-loss policy is a chain "
                             f"({' → '.join(zero.models)}): give --saver")
    saver = zero.models[0]
    calib, _ = calibration_and_test(zoo, [base, saver], None, None, seed)
    conf = calib.conf[saver].astype(np.float64)
    c_saver, c_base = model_cost(zoo, saver, cost), model_cost(zoo, base, cost)

    def gear(t: float, eps: float) -> Gear:
        exit_ratio = float(np.mean(conf >= t))
        return Gear(float(t), float(eps), exit_ratio, float(c_saver + (1 - exit_ratio) * c_base))

    certified = []
    for g in range(1, levels + 1):
        eps = max_loss * g / levels
        cfg = SelectorConfig(criterion="guaranteed", tolerance=eps, delta=delta / levels, cost=cost,
                             guarantee_method=method, seed=seed)
        best = select(zoo, base, cfg, savers=[saver]).best
        if best.found:
            certified.append(gear(best.thresholds[0], eps))
    if not certified:
        raise SelectionError(f"no threshold of {saver} is certified at ε = {max_loss:g} points, δ = {delta:g}: "
                             "no gear besides the zero-loss one; raise --max-loss")
    top = grid_ceiling(zero.thresholds[0])
    if top >= certified[0].threshold:
        first = gear(top, certified[0].max_loss)
        message = (f"{ZERO_KEPT} ({zero.thresholds[0]:.4f}) raised to the grid's "
                   f"{top:.4f}, certified by the first level's test")
    else:
        first = certified[0]
        message = (f"the zero-loss policy (threshold {zero.thresholds[0]:.4f}) exits more than the first level "
                   f"certifies, so gear 0 is that level's threshold ({first.threshold:.4f})")
    gears = [first]
    for g in certified:  # thresholds fall with the level; equal ones keep the smaller loss
        if g.threshold < gears[-1].threshold:
            gears.append(g)
    if len(gears) < 2:
        raise SelectionError(f"no gear cheaper than the zero-loss policy is certified at ε = {max_loss:g} points, "
                             f"δ = {delta:g} ({len(calib.labels):,} calibration samples); raise --max-loss")
    return GearPlan(saver, base, float(max_loss), float(delta), levels, cost, len(calib.labels), tuple(gears),
                    method, message)


def plan_gears(sel: Selection, zoo, max_loss: float, cfg) -> Selection:
    """``sel`` carrying the gears of its saver within ``max_loss`` points, planned with the δ, cost,
    guarantee method and seed of ``cfg`` (a `tinysaver.selector.SelectorConfig`); what ``query
    --gears`` and ``serve --gears --max-loss`` call. Refused unless ``sel`` is a saver → base pair."""
    if len(sel.stages) != 2:
        raise SelectionError("gears are planned for a saver → base pair; the selection is "
                             f"{' → '.join(sel.models)}" + (" (give --max-stages 2)" if sel.found else ""))
    return with_gears(sel, gear_plan(zoo, sel.base, max_loss, cfg.delta, saver=sel.models[0], cost=cfg.cost,
                                     method=cfg.guarantee_method, seed=cfg.seed))


def with_gears(sel: Selection, plan: GearPlan) -> Selection:
    """``sel`` carrying ``plan`` (saved with it by ``query --save``); refused when they differ in pair
    (by `Selection`'s own check, which a file read back meets too)."""
    return replace(sel, gears=plan.to_dict(), schema_version=GEARS_SCHEMA_VERSION)


# --- switching -------------------------------------------------------------------------------------

@dataclass
class GearBox:
    """Picks the gear from the load one replica sees; see the module.

    ``costs``: each gear's cost per image (the plan's), gear 0 the dearest; ``target_ms``: the p99
    latency to hold. Each decision is given the images waiting, the oldest one's age, the current
    gear's capacity (images per second of busy time, measured), the recent arrival rate (images/s)
    and the images of the batch it decides for (``serving``: counted in the predicted wait, not as
    waiting); another gear's capacity is the current one's scaled by the two costs. It moves up
    (cheaper) when the predicted wait passes ``up`` × target, or when images arrive faster than the
    current gear serves them and some wait behind the batch; and down one gear only when the dearer
    gear would serve the arrivals with ``headroom`` to spare and a wait under ``down`` × target, for
    ``hold`` decisions in a row."""

    costs: Sequence[float]
    target_ms: float
    up: float = 0.5
    down: float = 0.2
    headroom: float = 0.85
    hold: int = 20
    gear: int = 0
    calm: int = 0
    switches: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.costs) < 1 or any(not np.isfinite(c) or c <= 0 for c in self.costs):
            raise SelectionError(f"gear costs must be finite and > 0, got {list(self.costs)}")
        if not self.target_ms > 0 or not 0 < self.down < self.up or not 0 < self.headroom <= 1:
            raise SelectionError(f"a latency target > 0 ms, 0 < down < up and 0 < headroom ≤ 1 are needed, got "
                                 f"{self.target_ms}, {self.down}, {self.up}, {self.headroom}")

    def capacity(self, gear: int, capacity: float) -> float:
        """``gear``'s images per second, from the current gear's ``capacity`` and the two costs."""
        return capacity * self.costs[self.gear] / self.costs[gear]

    def wait_ms(self, gear: int, waiting: int, capacity: float) -> float:
        """Predicted time to serve ``waiting`` images in ``gear``."""
        c = self.capacity(gear, capacity)
        return 1e3 * waiting / c if c > 0 else (float("inf") if waiting else 0.0)

    def decide(self, waiting: int, oldest_ms: float, capacity: float, arrivals: float, serving: int = 0) -> int:
        """The gear for the next batch (see the class)."""
        g = self.gear
        # a lone request at low load is its own batch: it waits for nobody, so it is no backlog
        late = self.wait_ms(g, waiting + serving, capacity) + oldest_ms > self.up * self.target_ms
        if g < len(self.costs) - 1 and (late or (waiting and arrivals > self.capacity(g, capacity))):
            self.shift(g + 1, waiting)
        elif (g > 0 and arrivals < self.headroom * self.capacity(g - 1, capacity)
              and self.wait_ms(g - 1, waiting + serving, capacity) + oldest_ms < self.down * self.target_ms):
            self.calm += 1
            if self.calm >= self.hold:
                self.shift(g - 1, waiting)
        else:
            self.calm = 0
        return self.gear

    def shift(self, to: int, waiting: int) -> None:
        """Move to gear ``to`` (recorded with the images waiting then)."""
        self.switches.append((self.gear, to, waiting))
        self.gear, self.calm = to, 0


__all__ = ["LEVELS", "Gear", "GearBox", "GearPlan", "gear_plan", "grid_ceiling", "plan_gears", "with_gears"]
