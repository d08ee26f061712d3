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

import copy
import time

import numpy as np
import torch

from .exits import dynamic_predict, exit_flops, fit_temperatures, offline_outputs
from .gates import Gates, train_gates
from .label_free import soft_targets, tolerance_thresholds
from .policy import ExitPolicy, choose_policy
from .sdn import SDN
from .ztw import ZTW
from tinysaver.errors import UsageError

from .settings import FAMILIES, CompareSettings  # noqa: F401 (re-exported)

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
    bad = sorted(set(fams) - set(FAMILIES))
    if bad or not fams:
        raise UsageError(f"unknown method(s) {bad or text!r}; choose from {', '.join(FAMILIES)}")
    return list(dict.fromkeys(fams))


# --- training ---------------------------------------------------------------------------------------

def _target(cache: dict, labels: np.ndarray, label_free: bool) -> torch.Tensor:
    return soft_targets(cache["base_logits"]) if label_free else torch.as_tensor(labels)


def train_methods(pair, train, cache: dict, families, s: CompareSettings, log=print) -> dict:
    """Trained exit methods by row name, in table order."""
    from .fit import fit_exits
    from .train import TrainSettings, train_esn

    dims = tuple(pair.base_staged.stage_channels(pair.base.preprocess.input_size))
    k = pair.base.num_classes
    target = _target(cache, train.labels, s.label_free)
    fit = dict(epochs=s.epochs, lr=s.lr, seed=s.seed)
    out: dict = {"saver cascade": SaverOnly()}

    def esn(label_free: bool):
        settings = TrainSettings.from_yaml(None, **{"epochs": s.epochs, "seed": s.seed, **s.esn,
                                                    "label_free": label_free})
        return train_esn(pair, train, settings, log=lambda m: None, progress=False, cache=cache)

    if "esn" in families:
        log("training the ESN")
        out["saver + ESN"] = esn(s.label_free)
    sdn = None
    if "sdn" in families or "gates" in families:
        log("training SDN exits")
        torch.manual_seed(s.seed)  # every method starts from the same seed, whatever ran before it
        sdn = SDN(dims, k)
        fit_exits(lambda b: sdn(b["stage_feats"]), sdn.parameters(), cache, target, **fit)
        if "sdn" in families:
            out["SDN"] = sdn.eval()
    if "ztw" in families:
        for name, cascade, ensemble in (("ZTW", True, True), ("ZTW (ensembling only)", False, True)):
            log(f"training {name}")
            torch.manual_seed(s.seed)
            m = ZTW(dims, k, cascade=cascade, ensemble=ensemble)
            fit_exits(lambda b: m(b["stage_feats"], ensembled=False), m.classifier_params(), cache, target, **fit)
            fit_exits(lambda b: m(b["stage_feats"], ensembled=True), m.ensemble_params(), cache, target,
                      **{**fit, "lr": s.ensemble_lr})
            out[name] = m.eval()
            if cascade:  # the same trained classifiers without the ensemble
                conn = copy.deepcopy(m)
                conn.ensemble = False
                out["ZTW (connections only)"] = conn
    if "gates" in families:
        log("training gates on the frozen SDN exits")
        torch.manual_seed(s.seed)
        g = Gates(copy.deepcopy(sdn))
        flops = exit_flops(pair, g.exits)
        with torch.inference_mode():
            ex = g.exits.offline(cache)
        train_gates(g, ex, cache["base_logits"], target, flops["per_exit"] / flops["base_total"],
                    lam=s.gate_lambda, seed=s.seed)
        out[f"gates (λ={s.gate_lambda:g})"] = g
    if "label-free" in families:
        log("training label-free SDN exits and a label-free ESN")
        torch.manual_seed(s.seed)
        lf = SDN(dims, k)
        fit_exits(lambda b: lf(b["stage_feats"]), lf.parameters(), cache, soft_targets(cache["base_logits"]), **fit)
        out["label-free SDN"] = lf.eval()
        out["label-free saver + ESN"] = esn(True)
    return out


# --- evaluation --------------------------------------------------------------------------------------

def evaluate(d: dict, thresholds, per_exit: np.ndarray, base_total: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(accuracy, mean FLOPs as a fraction of the base, answers, running-order exit) of one policy."""
    pol = ExitPolicy(list(thresholds))
    ans, where = pol.apply(d["preds"], d["confs"], d["base_pred"])
    return float((ans == d["labels"]).mean()), float(per_exit[where].mean() / base_total), ans, where


def candidates(calib: dict) -> list[list[float]]:
    """The policies every method is searched over: a grid on the first exit's score × one shared
    threshold for the later exits, plus the greedy bounded-loss policies of :func:`choose_policy`."""
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


def method_row(name, method, pair, feats: dict, labels: dict, test_images, s: CompareSettings, log=print) -> dict:
    """Every column of the comparison for one method (thresholds from calib, numbers from test)."""
    from tinysaver.calibration import cascade_conformal, coverage_and_size, ece

    # seed 001's label-free exits are always temperature-calibrated; the others when asked
    calibrated = s.calibrate or name.startswith("label-free")
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
    own = None
    if name.startswith("gates"):
        own = [0.5] * cal["confs"].shape[0]  # the seed's rule: leave when the gate says so
    elif name.startswith("label-free"):
        own = tolerance_thresholds(cal["preds"], cal["confs"], cal["base_pred"], s.lf_tolerance)
    if own is not None:
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
    row["_front"] = front
    log(f"{name}: zero loss {row['zero_loss_acc']:.2f}% at {row['zero_loss_flops_pct']:.1f}% FLOPs")
    return row


def base_row(pair, feats: dict, labels: dict, test_images, s: CompareSettings) -> dict:
    """The base alone: its test accuracy, ECE, conformal sets and eager wall-clock."""
    from tinysaver.calibration import coverage_and_size, conformal_quantile, ece, fit_temperature, prediction_sets
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


def compare(zoo, saver: str, base: str, families, s: CompareSettings | None = None, log=print):
    """Train every method of ``families`` on the pair and evaluate them: a list of row dicts."""
    from .train import Pair, esn_splits, frozen_features

    s = s or CompareSettings()
    families = parse_families(families) if isinstance(families, str) else list(families)
    pair = Pair.from_zoo(zoo, saver, base)
    train, calib, test = esn_splits(zoo, seed=s.seed, limit=s.train_limit)
    log(f"features: train {len(train)}, calib {len(calib)}, test {len(test)} images")
    feats = {"train": frozen_features(pair, train.images), "calib": frozen_features(pair, calib.images),
             "test": frozen_features(pair, test.images)}
    labels = {"calib": np.asarray(calib.labels), "test": np.asarray(test.labels)}
    methods = train_methods(pair, train, feats["train"], families, s, log)
    rows = [base_row(pair, feats, labels, test.images, s)]
    for name, m in methods.items():
        rows.append(method_row(name, m, pair, feats, labels, test.images, s, log))
    return rows


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


def plot_rows(rows: list[dict], path, title: str = "") -> None:
    """Accuracy against FLOPs (test), one curve per method from its calib-Pareto policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinysaver.zoo import atomic_write_bytes
    import io

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["method"] == "base alone":
            ax.axhline(r["zero_loss_acc"], color="k", ls=":", lw=1, label="base alone")
            continue
        f = r["_front"]
        ax.plot([100 * p[2] for p in f], [100 * p[3] for p in f], marker=".", ms=3, lw=1.2, label=r["method"])
    ax.set_xlabel("FLOPs per image, % of the base (test)")
    ax.set_ylabel("test accuracy, %")
    ax.set_xlim(0, 105)
    lo = min(100 * p[3] for r in rows if "_front" in r for p in r["_front"] if p[2] <= 1.05)
    ax.set_ylim(max(lo, rows[0]["zero_loss_acc"] - 15), None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
