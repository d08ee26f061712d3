"""PNG plots of a saver–base pair (needs the ``plot`` extra: matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .policy import answers, apply
from .selector import SelectorConfig, select
from .splits import SplitData, calibration_and_test
from .costs import available_costs
from .errors import MissingExtraError, UsageError


def exit_curve(sd: SplitData, base: str, saver: str, points: int = 200) -> tuple[np.ndarray, ...]:
    """At ``points`` thresholds (quantiles of the saver's confidence): exit ratio, saver and base
    accuracy on the exited samples, and cascade accuracy on all samples."""
    qs = np.unique(np.quantile(sd.conf[saver].astype(np.float64), np.linspace(0, 1, points)))[::-1]
    y = sd.labels
    rows = []
    for t in qs:
        where = apply([sd.conf[saver]], [t])
        ex = where == 0
        casc = answers(np.stack([sd.pred[saver], sd.pred[base]]), where)
        rows.append((ex.mean(), (sd.pred[saver][ex] == y[ex]).mean(), (sd.pred[base][ex] == y[ex]).mean(),
                     (casc == y).mean()))
    return tuple(np.array(c) for c in zip(*rows))


def plot_pair(zoo, base: str, saver: str, out: str | Path, cfg: SelectorConfig | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingExtraError("plots need matplotlib: pip install 'tinysaver[plot]'") from e
    cfg = cfg or SelectorConfig()
    if saver == base:
        raise UsageError(f"a model cannot be its own saver: {saver!r} is the base; pick a cheaper --saver")
    zoo.model(base), zoo.model(saver)
    calib, test = calibration_and_test(zoo, [base, saver], cfg.calib_split, cfg.test_split, cfg.seed)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for sd, style in ((calib, "--"), (test, "-")):
        if sd is None:
            continue
        r, s_acc, b_acc, casc = exit_curve(sd, base, saver)
        ax1.plot(r, s_acc, style, color="tab:orange", label=f"saver on exited [{sd.name}]")
        ax1.plot(r, b_acc, style, color="tab:blue", label=f"base on exited [{sd.name}]")
        ax1.plot(r, casc, style, color="tab:green", label=f"cascade, all samples [{sd.name}]")
    ax1.set_xlabel("early-exit ratio")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"{base} – {saver}")
    ax1.legend(fontsize=7)
    # Pareto front of every measured model as a saver for this base
    costs = available_costs(zoo, zoo.measured(), cfg.cost)
    pts = []
    for m in zoo.measured():
        if m == base or costs[m] >= costs[base]:
            continue
        sel = select(zoo, base, cfg, savers=[m], top=1).best
        pts.append((sel.cost_cascade / costs[base], sel.acc_cascade_test if sel.acc_cascade_test is not None
                    else sel.acc_cascade_calib, m))
    if pts:
        xs, ys, names = zip(*pts)
        ax2.scatter(xs, ys, color="tab:gray")
        for x, y, nme in pts:
            ax2.annotate(nme, (x, y), fontsize=6)
        front = sorted(pts)
        best, fx, fy = -1.0, [], []
        for x, y, _ in front:
            if y > best:
                best = y
                fx.append(x)
                fy.append(y)
        ax2.plot(fx, fy, "-", color="tab:red", label="Pareto front")
        mine = [(x, y) for x, y, nme in pts if nme == saver]
        if mine:  # the --saver of the left panel, where it stands among every other saver
            ax2.scatter(*zip(*mine), s=80, color="tab:orange", zorder=3, label=f"{saver} (--saver)")
    ax2.axvline(1.0, color="tab:blue", lw=0.8, label="base alone")
    ax2.set_title(f"every saver for {base}" + ("" if any(n == saver for *_, n in pts) else
                                              f" ({saver} costs at least the base: not shown)"), fontsize=9)
    ax2.set_xlabel(f"relative cost ({cfg.cost})")
    ax2.set_ylabel("cascade accuracy (held out)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["exit_curve", "plot_pair"]
