"""The live audit, replayed offline: false drift on clean traffic, and the delay to call a real shift.

    python benchmarks/bench_audit.py --streams 200 --requests 20000

Streams are drawn (seeded, with replacement) from Fashion-MNIST ``test``, for the default cascade
of the bundled zoo (mobilenetv3_small_075 → resnet10t at its zero-loss threshold). Each request
exits at the saver when its confidence passes the threshold, is audited with probability
``--audit``, and the audit says whether the saver's class differs from the base's: the
``AuditMonitor`` the service runs sees exactly this. Clean traffic uses the zoo's stored
predictions. Shifted traffic uses the same test images rolled right by 8 pixels, run through the
cascade here once (``--shifts``: ``roll8``, ``invert`` for 255 − pixel, ``noise`` for Gaussian noise
of σ = 64 grey levels, seeded, clipped to 0–255). Reported:

- P(any drift) over the clean streams, checked after every request, for each audit fraction
  (the goal: ≤ δ), and how many streams end certified;
- for streams that turn to shifted traffic at request ``--shift-at``: drift before the shift
  (must be none), and the delay in requests to the first drift (median and 90th percentile);
- ``--adapt`` against the fixed threshold on the same shifted streams (``--adapt-streams`` of
  them): the loss against the base on the post-shift requests, the exit ratio kept there, and the
  threshold each stream ends at. ``ThresholdAdapter`` sees what the service gives it: the saver's
  class and confidence for every request, the base's class where the base answered or an audit ran.
"""
from __future__ import annotations

import argparse

import numpy as np

from common import table_head


def outcomes(exit_, disagree, n: int, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """(early, hit) per request: hit = exited, audited and disagreeing."""
    idx = rng.integers(0, len(exit_), n)
    early = exit_[idx]
    hit = early & (rng.random(n) < fraction) & disagree[idx]
    return early, hit


def replay(monitor, early: np.ndarray, hit: np.ndarray) -> list[tuple[int, str, str]]:
    for e, h in zip(early.tolist(), hit.tolist()):
        if h:
            monitor.audited(monitor.request(True, audit=True), True)
        else:
            monitor.request(e)  # an audited agreement and no audit settle the same way: no hit
    return monitor.changes


def plot_delays(curves: dict, horizon: int, path: str) -> None:
    """One step curve per (audit fraction, shift): the share of streams called drift within r requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (a, name), (delays, n) in curves.items():
        xs = [0, *delays, horizon]
        ys = [0, *(np.arange(1, len(delays) + 1) / n), len(delays) / n]
        ax.step(xs, ys, where="post", label=f"{name}, {a:.0%} audited")
    ax.set_xlabel("requests after the shift")
    ax.set_ylabel("share of streams called drift")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--audits", type=float, nargs="+", default=[0.05, 0.02], help="audit fractions to replay")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy points (the service's default)")
    ap.add_argument("--shift-at", type=int, default=5000)
    ap.add_argument("--shifts", default="roll8,invert,noise", help="comma-separated: roll8, invert, noise")
    ap.add_argument("--adapt-streams", type=int, default=50, help="streams for the --adapt comparison (0: none)")
    ap.add_argument("--png", help="also plot the share of shifted streams called drift against requests after the shift")
    args = ap.parse_args()

    import logging

    import torch

    logging.getLogger("tinysaver.serve").setLevel(logging.ERROR)  # thousands of state changes: the table says it

    from tinysaver.cascade import build_cascade
    from tinysaver.data import load_dataset
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve.adapt import ThresholdAdapter
    from tinysaver.serve.adapt import replay as replay_adapter
    from tinysaver.serve.audit import AuditMonitor
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("fashion-mnist")
    sel = select(zoo, "resnet10t", SelectorConfig()).best
    saver, base = sel.models
    sp, bp = zoo.predictions(saver, "test"), zoo.predictions(base, "test")
    s_pred, s_conf, b_pred = sp.pred, sp.conf, bp.pred
    clean_exit = s_conf >= sel.thresholds[0]
    clean_dis = s_pred != b_pred
    images = load_dataset("fashion-mnist:test", progress=False).images
    shifted = {"roll8": lambda x: torch.roll(x, 8, dims=3), "invert": lambda x: 255 - x,
               "noise": lambda x: (x.float() + 64 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
               .round().clamp(0, 255).to(torch.uint8)}
    cascade = build_cascade(sel, zoo)
    shifts, raw = {}, {"clean": (s_conf.astype(np.float64), s_pred, b_pred)}
    for name in args.shifts.split(","):
        res = cascade.predict(shifted[name](images), all_stages=True, batch_size=256)
        shifts[name] = (res.stage == 0, res.stage_pred[0] != res.stage_pred[1])
        raw[name] = (res.stage_conf[0].astype(np.float64), res.stage_pred[0], res.stage_pred[1])
    print(f"{saver} → {base} at {sel.thresholds[0]:.4f}; δ {args.delta}, tolerance {args.tolerance} points; clean "
          f"test: exit {clean_exit.mean():.1%}, loss against the base {(clean_exit & clean_dis).mean() * 100:.2f} points")
    for name, (ex, dis) in shifts.items():
        print(f"  {name}: exit {ex.mean():.1%}, loss against the base {(ex & dis).mean() * 100:.2f} points")
    table_head("\n| audit | streams × requests | P(any drift), clean | ends certified |")
    for a in args.audits:
        false = certified = 0
        for seed in range(args.streams):
            m = AuditMonitor(a, args.delta, args.tolerance)
            changes = replay(m, *outcomes(clean_exit, clean_dis, args.requests, a, np.random.default_rng(seed)))
            false += any(to == "drift" for _, _, to in changes)
            certified += m.state == "certified"
        print(f"| {a} | {args.streams} × {args.requests:,} | {false / args.streams:.3f} | "
              f"{certified / args.streams:.0%} |", flush=True)
    table_head(f"\n| audit | shift at request {args.shift_at:,} | drift before the shift | delay to drift, median | "
          "90th pct | never called |")
    curves = {}
    for a in args.audits:
        for name, (shift_exit, shift_dis) in shifts.items():
            early_alarm, delays, missed = 0, [], 0
            for seed in range(args.streams):
                rng = np.random.default_rng([seed, 1])  # not the clean table's streams
                m = AuditMonitor(a, args.delta, args.tolerance)
                replay(m, *outcomes(clean_exit, clean_dis, args.shift_at, a, rng))
                early_alarm += any(to == "drift" for _, _, to in m.changes)
                before = len(m.changes)
                replay(m, *outcomes(shift_exit, shift_dis, args.requests - args.shift_at, a, rng))
                hit = next((r for r, _, to in m.changes[before:] if to == "drift"), None)
                if hit is None:
                    missed += 1
                else:
                    delays.append(hit - args.shift_at)
            curves[a, name] = (sorted(delays), args.streams)
            med, p90 = (f"{np.median(delays):.0f}", f"{np.percentile(delays, 90):.0f}") if delays else ("–", "–")
            print(f"| {a} | {name} | {early_alarm} | {med} | {p90} | {missed} |", flush=True)
    if args.png:
        plot_delays(curves, args.requests - args.shift_at, args.png)
    if args.adapt_streams:
        t0 = sel.thresholds[0]
        table_head(f"\n| audit | shift | streams | post-shift loss against the base, fixed → adapt (points) | "
              f"post-shift exit ratio, fixed → adapt | threshold at the end, median (from {t0:.4f}) | "
              "streams that moved before the shift |")
        for a in args.audits:
            for name in shifts:
                fixed_loss, adapt_loss, fixed_exit, adapt_exit, ends, moved = [], [], [], [], [], 0
                for seed in range(args.adapt_streams):
                    rng = np.random.default_rng([seed, 2])
                    ad = ThresholdAdapter(t0, a, args.delta, args.tolerance, seed=seed)
                    out = []
                    for part, n in (("clean", args.shift_at), (name, args.requests - args.shift_at)):
                        conf, sp_, bp_ = raw[part]
                        for i in rng.integers(0, len(conf), n).tolist():
                            early = replay_adapter(ad, int(sp_[i]), conf[i], int(bp_[i]), rng.random)
                            out.append((early, early and sp_[i] != bp_[i], conf[i] >= t0 and sp_[i] != bp_[i],
                                        conf[i] >= t0))
                    post = np.array(out[args.shift_at:], dtype=float)
                    adapt_exit.append(post[:, 0].mean())
                    adapt_loss.append(100 * post[:, 1].mean())
                    fixed_loss.append(100 * post[:, 2].mean())
                    fixed_exit.append(post[:, 3].mean())
                    ends.append(ad.threshold)
                    moved += any(sw["request"] <= args.shift_at for sw in ad.switches)
                end = np.median(ends)
                print(f"| {a} | {name} | {args.adapt_streams} | {np.mean(fixed_loss):.2f} → {np.mean(adapt_loss):.2f} | "
                      f"{np.mean(fixed_exit):.3f} → {np.mean(adapt_exit):.3f} | "
                      f"{'∞ (base alone)' if not np.isfinite(end) else f'{end:.4g}'} | {moved} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
