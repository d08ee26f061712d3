"""``tinysaver exits compare``: every exit method on one saver–base pair, one protocol.

All methods share the stage split, the feature cache (train split), the policy search (thresholds
chosen on ``calib``) and the evaluation (reported on ``test``):

- accuracy at 25/50/75/100 % of the base's FLOPs (the best calib policy within the budget);
- FLOPs at zero loss against the base, and at a 0.5-point loss (``choose_policy``);
- the method's overhead in FLOPs and parameters; ECE of the answers; conformal sets of the cascade;
- wall-clock of dynamic inference (the unused stages really skipped) at batch 1 and 128 for the
  zero-loss policy, and whether it equals the offline policy.

The saver cascade and the base alone are rows of the same table.
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch

from tinysaver.calibration import (cascade_conformal, conformal_quantile, coverage_and_size, ece, fit_temperature,
                                   prediction_sets)
from tinysaver.errors import UsageError
from tinysaver.zoo import atomic_write_bytes

from .exits import dynamic_predict, exit_flops, fit_temperatures, offline_outputs
from .methods import Context, ExitMethod, registered, trainer
from .policy import ExitPolicy, choose_policy
from .settings import CompareSettings
from .train import Pair, esn_splits, frozen_features

BUDGETS = (0.25, 0.5, 0.75, 1.0)
WALLCLOCK_REPEATS = 3  # best of: a neighbour can only slow a run down


class SaverOnly(torch.nn.Module):
    """The plain saver → base cascade as an exit method: exit 0 is the saver, nothing inside the base."""

    uses_saver, num_exits = True, 0

    def offline(self, feats):
        return feats["saver_logits"].new_zeros((0, *feats["saver_logits"].shape))

    def begin(self, saver_feat, saver_logits):
        return None

    def step(self, n, stage_out, state):
        raise AssertionError("the saver cascade has no exit inside the base")

    def select(self, state, keep):
        return state


def parse_families(text: str) -> list[str]:
    fams = [f.strip() for f in text.split(",") if f.strip()]
    bad = sorted(set(fams) - set(registered()))
    if bad or not fams:
        raise UsageError(f"unknown method(s) {bad or text!r}; choose from {', '.join(registered())}")
    return list(dict.fromkeys(fams))


# --- training ---------------------------------------------------------------------------------------

def train_methods(pair, train, cache: dict, families, s: CompareSettings, log=print) -> dict[str, ExitMethod]:
    """Trained exit methods by row name, in table order (the order the families are registered in)."""
    ctx = Context(pair, train, cache, s, log)
    out: dict[str, ExitMethod] = {"saver cascade": ExitMethod(SaverOnly())}
    for family in registered():
        if family in families:
            out.update(trainer(family)(ctx))
    return out


# --- evaluation --------------------------------------------------------------------------------------

def evaluate(d: dict, thresholds, per_exit: np.ndarray, base_total: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(accuracy, mean FLOPs as a fraction of the base, answers, running-order exit) of one policy."""
    pol = ExitPolicy(list(thresholds))
    ans, where = pol.apply(d["preds"], d["confs"], d["base_pred"])
    return float((ans == d["labels"]).mean()), float(per_exit[where].mean() / base_total), ans, where


def candidates(calib: dict) -> list[list[float]]:
    """The policies every method is searched over: a grid on the first exit's score × one shared
    threshold for the later exits, plus the greedy bounded-loss policies of `choose_policy`."""
    e = calib["confs"].shape[0]
    if e == 0:
        return [[]]
    g0 = np.concatenate([np.unique(np.quantile(calib["confs"][0], np.linspace(0, 1, 41))), [np.inf]])
    if e == 1:
        cands = [[float(t)] for t in g0]
    else:
        g1 = np.concatenate([np.unique(np.quantile(calib["confs"][1:], np.linspace(0, 1, 21))), [np.inf]])
        cands = [[float(t0)] + [float(t1)] * (e - 1) for t0 in g0 for t1 in g1]
    for tol in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        cands.append(choose_policy(calib["preds"], calib["confs"], calib["base_pred"], calib["labels"],
                                   "bounded", tol).thresholds)
    return cands


def pareto(calib: dict, test: dict, per_exit, base_total) -> list[tuple[float, float, float, float]]:
    """(calib cost, calib acc, test cost, test acc) of the calib-Pareto-optimal candidates."""
    pts = []
    for th in candidates(calib):
        a, c, _, _ = evaluate(calib, th, per_exit, base_total)
        pts.append((c, a, th))
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best = [], -1.0
    for c, a, th in pts:
        if a > best:
            best = a
            ta, tc, _, _ = evaluate(test, th, per_exit, base_total)
            front.append((c, a, tc, ta))
    return front


def method_row(name, em: ExitMethod, pair, feats: dict, labels: dict, test_images, s: CompareSettings,
               log=print) -> tuple[dict, list]:
    """Every column of the comparison for one method (thresholds from calib, numbers from test), and
    its calib-Pareto front: (calib cost, calib acc, test cost, test acc) per policy."""
    method = em.module
    calibrated = s.calibrate or em.calibrated
    temps = fit_temperatures(method, feats["calib"], labels["calib"]) if calibrated else None
    cal = offline_outputs(method, feats["calib"], labels["calib"], temps)
    tst = offline_outputs(method, feats["test"], labels["test"], temps)
    fl = exit_flops(pair, method)
    per_exit, base_total = fl["per_exit"], fl["base_total"]
    row = {"method": name, "exits": cal["confs"].shape[0],
           "params": sum(p.numel() for p in method.parameters()),
           "overhead_flops_pct": 100 * fl["overhead"] / base_total}
    front = pareto(cal, tst, per_exit, base_total)
    for b in BUDGETS:
        ok = [p for p in front if p[0] <= b + 1e-9]
        row[f"acc@{int(100 * b)}%"] = f"{100 * ok[-1][3]:.2f} @ {100 * ok[-1][2]:.0f}%" if ok else "—"
    zero = choose_policy(cal["preds"], cal["confs"], cal["base_pred"], cal["labels"], "zero")
    half = choose_policy(cal["preds"], cal["confs"], cal["base_pred"], cal["labels"], "bounded", 0.5)
    acc0, cost0, _, where0 = evaluate(tst, zero.thresholds, per_exit, base_total)
    acc5, cost5, _, _ = evaluate(tst, half.thresholds, per_exit, base_total)
    row.update({"zero_loss_acc": 100 * acc0, "zero_loss_flops_pct": 100 * cost0,
                "half_pt_acc": 100 * acc5, "half_pt_flops_pct": 100 * cost5})
    if em.own_rule is not None:
        own = em.own_rule(cal, s)
        a, c, _, _ = evaluate(tst, own, per_exit, base_total)
        row["own_rule"] = f"{100 * a:.2f} @ {100 * c:.0f}%"
    # uncertainty of the answers under the zero-loss policy
    _, _, _, where_c = evaluate(cal, zero.thresholds, per_exit, base_total)
    answered_t = tst["probs"][where0, np.arange(len(where0))]
    answered_c = cal["probs"][where_c, np.arange(len(where_c))]
    row["ece_pct"] = 100 * ece(answered_t, tst["labels"])
    sets, _ = cascade_conformal(answered_c, cal["labels"], where_c, answered_t, where0, s.alpha)
    row["coverage"], row["set_size"] = coverage_and_size(sets, tst["labels"])
    row["exit_share"] = [float((where0 == e).mean()) for e in range(len(per_exit))]
    if s.wallclock_images and test_images is not None:
        policy = ExitPolicy(zero.thresholds, temps)
        imgs = test_images[: s.wallclock_images]
        for bs in (1, 128):
            best = np.inf
            for _ in range(WALLCLOCK_REPEATS):
                t0 = time.perf_counter()
                ans, where = dynamic_predict(pair, method, policy, imgs, batch_size=bs)
                best = min(best, time.perf_counter() - t0)
            row[f"ms_per_img_bs{bs}"] = 1e3 * best / len(imgs)
        ref_ans, ref_where = policy.apply(tst["preds"][:, :len(imgs)], tst["confs"][:, :len(imgs)],
                                          tst["base_pred"][:len(imgs)])
        row["dynamic_match"] = float(((ans == ref_ans) & (where == ref_where)).mean())
    log(f"{name}: zero loss {row['zero_loss_acc']:.2f}% at {row['zero_loss_flops_pct']:.1f}% FLOPs")
    return row, front


def base_row(pair, feats: dict, labels: dict, test_images, s: CompareSettings) -> dict:
    """The base alone: its test accuracy, ECE, conformal sets and eager wall-clock."""
    from tinysaver.transforms import prepare_batch

    t = fit_temperature(feats["calib"]["base_logits"], labels["calib"]) if s.calibrate else 1.0
    pc = (feats["calib"]["base_logits"].float() / t).softmax(-1)
    pt = (feats["test"]["base_logits"].float() / t).softmax(-1)
    acc = float((pt.argmax(-1).numpy() == labels["test"]).mean())
    row = {"method": "base alone", "exits": 0, "params": 0, "overhead_flops_pct": 0.0,
           **{f"acc@{int(100 * b)}%": (f"{100 * acc:.2f} @ 100%" if b >= 1 else "—") for b in BUDGETS},
           "zero_loss_acc": 100 * acc, "zero_loss_flops_pct": 100.0, "half_pt_acc": 100 * acc,
           "half_pt_flops_pct": 100.0, "ece_pct": 100 * ece(pt, labels["test"])}
    sets = prediction_sets(pt, conformal_quantile(pc, labels["calib"], s.alpha))
    row["coverage"], row["set_size"] = coverage_and_size(sets, labels["test"])
    if s.wallclock_images and test_images is not None:
        imgs = test_images[: s.wallclock_images]
        with torch.inference_mode():
            for bs in (1, 128):
                best = np.inf
                for _ in range(WALLCLOCK_REPEATS):
                    t0 = time.perf_counter()
                    for i in range(0, len(imgs), bs):
                        pair.base.module(prepare_batch(imgs[i:i + bs], pair.base.preprocess))
                    best = min(best, time.perf_counter() - t0)
                row[f"ms_per_img_bs{bs}"] = 1e3 * best / len(imgs)
    return row


def compare(zoo, saver: str, base: str, families, s: CompareSettings | None = None,
            log=print) -> tuple[list[dict], dict[str, list]]:
    """Train every method of ``families`` on the pair and evaluate them: the table's rows (dicts,
    JSON-ready) and each method's calib-Pareto front by method name (for `plot_rows`)."""
    s = s or CompareSettings()
    families = parse_families(families) if isinstance(families, str) else list(families)
    pair = Pair.from_zoo(zoo, saver, base)
    train, calib, test = esn_splits(zoo, seed=s.seed, limit=s.train_limit)
    log(f"features: train {len(train)}, calib {len(calib)}, test {len(test)} images")
    feats = {"train": frozen_features(pair, train.images), "calib": frozen_features(pair, calib.images),
             "test": frozen_features(pair, test.images)}
    labels = {"calib": np.asarray(calib.labels), "test": np.asarray(test.labels)}
    methods = train_methods(pair, train, feats["train"], families, s, log)
    rows, fronts = [base_row(pair, feats, labels, test.images, s)], {}
    for name, m in methods.items():
        row, fronts[name] = method_row(name, m, pair, feats, labels, test.images, s, log)
        rows.append(row)
    return rows, fronts


def format_rows(rows: list[dict]) -> str:
    """The comparison as a markdown table."""
    cols = [("method", "method", "{}"), ("acc@25%", "25%", "{}"), ("acc@50%", "50%", "{}"),
            ("acc@75%", "75%", "{}"), ("acc@100%", "100%", "{}"),
            ("zero_loss_flops_pct", "FLOPs at zero loss", "{:.1f}%"), ("zero_loss_acc", "acc", "{:.2f}"),
            ("half_pt_flops_pct", "FLOPs at −0.5 pt", "{:.1f}%"), ("overhead_flops_pct", "overhead FLOPs", "{:.2f}%"),
            ("params", "params", "{:,}"), ("ece_pct", "ECE %", "{:.2f}"), ("coverage", "coverage", "{:.3f}"),
            ("set_size", "set size", "{:.2f}"), ("ms_per_img_bs1", "ms/img bs1", "{:.2f}"),
            ("ms_per_img_bs128", "ms/img bs128", "{:.3f}"), ("dynamic_match", "dyn = offline", "{:.3f}"),
            ("own_rule", "own rule", "{}")]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if r.get(k) is not None else "—" for k, _, f in cols) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], fronts: dict[str, list], path, title: str = "") -> None:
    """Accuracy against FLOPs (test), one curve per method from its calib-Pareto policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["method"] not in fronts:  # the base alone
            ax.axhline(r["zero_loss_acc"], color="k", ls=":", lw=1, label=r["method"])
            continue
        f = fronts[r["method"]]
        ax.plot([100 * p[2] for p in f], [100 * p[3] for p in f], marker=".", ms=3, lw=1.2, label=r["method"])
    ax.set_xlabel("FLOPs per image, % of the base (test)")
    ax.set_ylabel("test accuracy, %")
    ax.set_xlim(0, 105)
    lo = min(100 * p[3] for f in fronts.values() for p in f if p[2] <= 1.05)
    ax.set_ylim(max(lo, rows[0]["zero_loss_acc"] - 15), None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["BUDGETS", "WALLCLOCK_REPEATS", "SaverOnly", "parse_families", "train_methods", "evaluate",
           "candidates", "pareto", "method_row", "base_row", "compare", "format_rows", "plot_rows"]
