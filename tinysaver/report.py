"""Every table and text the command line prints, in one place (no computing here)."""
from __future__ import annotations

import re
from typing import Any

from .criteria import CP_REPORT_DELTA, SMALL_CALIBRATION, get_criterion
from .policy import Selection


def summary_row(sel: Selection) -> dict[str, Any]:
    """One table row of a selection (Table 5 style): savers, thresholds, exit ratio, costs, accuracies."""
    r: dict[str, Any] = {
        "base": sel.base,
        "saver": " → ".join(s.model for s in sel.savers) or "(none)",
        "threshold": ", ".join(f"{s.threshold:.4f}" for s in sel.savers),
        "exit_ratio": round(float(sum(sel.exit_ratio_calib[:-1])), 4) if sel.found else 0.0,
    }
    if sel.cost_metric == "flops":
        r["GFLOPs_base"] = round(sel.cost_base / 1e9, 5)
        r["GFLOPs_cascade"] = round(sel.cost_cascade / 1e9, 5)
    else:
        r["ms_base"] = round(sel.cost_base, 4)
        r["ms_cascade"] = round(sel.cost_cascade, 4)
    r["saving_%"] = round(sel.saving_pct, 2) + 0.0
    r[f"acc_base_{sel.calib_split}"] = round(100 * sel.acc_base_calib, 2)
    r[f"acc_cascade_{sel.calib_split}"] = round(100 * sel.acc_cascade_calib, 2)
    if sel.test_split is not None:
        r[f"acc_base_{sel.test_split}"] = round(100 * sel.acc_base_test, 2)
        r[f"acc_cascade_{sel.test_split}"] = round(100 * sel.acc_cascade_test, 2)
    return r


def _fmt_cost(x: float, metric: str) -> str:
    return f"{x / 1e9:.4f} GFLOPs" if metric == "flops" else f"{x:.4f} ms/img"


def describe(sel: Selection) -> str:
    """Human-readable answer to 'which saver, at what confidence?'."""
    lines = [f"base: {sel.base}  (zoo {sel.zoo}, criterion {sel.criterion}"
             + (f", ε={sel.tolerance} pts" if get_criterion(sel.criterion).takes_tolerance else "")
             + (f", δ={sel.delta}" if sel.delta is not None else "")
             + f", target {sel.target})"]
    if not sel.found:
        lines.append(sel.message)
    else:
        chain = " → ".join(f"{s.model} (conf ≥ {s.threshold:.6g})" for s in sel.savers)
        lines.append(f"saver: {chain} → {sel.base}")
        if sel.exit_ratio_calib:
            lines.append("exit ratio: " + ", ".join(f"{r:.1%}" for r in sel.exit_ratio_calib[:-1])
                         + f" on {sel.calib_split}")
        if any(sel.near_threshold_calib):
            lines.append(f"warning: {sum(sel.near_threshold_calib)} calibration sample(s) lie within 1e-5 of a "
                         "threshold; float noise may move them")
    if sel.cost_base is not None:
        lines.append(f"cost: {_fmt_cost(sel.cost_base, sel.cost_metric)} → "
                     f"{_fmt_cost(sel.cost_cascade, sel.cost_metric)}  (saving {round(sel.saving_pct, 1) + 0.0:.1f}%)")  # + 0.0: never "-0.0"
    # label-free selections measure agreement with the base, not accuracy: say which
    what = "agreement with the base" if sel.target == "base-agreement" else "accuracy"
    if sel.acc_base_calib is not None:
        lines.append(f"{what} on {sel.calib_split} (calibration): {100 * sel.acc_base_calib:.2f}% → "
                     f"{100 * sel.acc_cascade_calib:.2f}%")
    if sel.test_split is not None and sel.acc_base_test is not None:
        lines.append(f"{what} on {sel.test_split} (held out):    {100 * sel.acc_base_test:.2f}% → "
                     f"{100 * sel.acc_cascade_test:.2f}%")
    if sel.guarantee:
        lines.append(f"guarantee: {sel.guarantee}")
    if sel.cp_bound_points is not None and sel.found:

        lost = "agreement with the base" if sel.target == "base-agreement" else "accuracy against the base"
        lines.append(f"Clopper–Pearson (δ = {CP_REPORT_DELTA:g}, {sel.calib_samples} calibration samples): at most "
                     f"{max(sel.cp_bound_points, 0.0):.2f} points of {lost} lost on new images, were the policy "
                     "fixed before those samples; it was chosen on them, so this is optimistic")
        if sel.calib_samples < SMALL_CALIBRATION:
            lines.append(f"warning: {sel.calib_samples} calibration samples say little beyond themselves; for a "
                         "statement about new images use --criterion guaranteed")
    return "\n".join(lines)


CONCEPTS = "docs/concepts.md"  # where each term of the details is explained once


def headline(sel: Selection) -> str:
    """The answer in one plain sentence: how much the small model answers alone, and what the
    cascade keeps, at what share of the base's compute."""
    if not sel.found:
        why = re.search(r"\((.*)\)$", sel.message or "")
        return f"No smaller model can answer for {sel.base} here{f' ({why.group(1)})' if why else ''}: it runs alone."
    who = " then ".join(s.model for s in sel.savers)
    alone = sum(sel.exit_ratio_calib[:-1]) if sel.exit_ratio_calib else None
    share = f" at {sel.cost_cascade / sel.cost_base:.0%} of its compute" if sel.cost_base else ""
    n = f"the {sel.calib_samples:,} calibration images" if sel.calib_samples else "the calibration images"
    what = "accuracy"
    base_acc, acc = sel.acc_base_calib, sel.acc_cascade_calib
    if base_acc is None or acc is None:
        kept = f"the cascade runs{share}"
    elif sel.target == "base-agreement":  # label-free: what is measured is agreement with the base
        kept = f"the cascade gives {sel.base}'s own answer on {100 * acc:.2f} % of {n}{share}"
    elif round(acc, 4) >= round(base_acc, 4):
        kept = f"the cascade keeps {sel.base}'s {what} ({100 * acc:.2f} % on {n}){share}"
    else:
        kept = (f"the cascade gives {100 * acc:.2f} % {what} against {sel.base}'s {100 * base_acc:.2f} % on {n}"
                f"{share}")
    first = f"{who} answer{'s' if len(sel.savers) == 1 else ''} {alone:.0%} of images alone" if alone is not None \
        else f"{who} answer{'s' if len(sel.savers) == 1 else ''} first"
    return f"{first}; {kept}."


def render(result, quiet: bool = False) -> str:
    """A `SelectionResult` as ``tinysaver query`` prints it: the answer in
    one sentence (`headline`; alone with ``quiet``), then the details of the best policy
    (`describe`) and the next best candidates as a table."""
    if quiet:
        return headline(result.best)
    text = headline(result.best) + f"\n\ndetails (the terms are explained in {CONCEPTS}):\n" + describe(result.best)
    if len(result.candidates) > 1:
        text += "\n\nnext best candidates (calibration split):\n" + format_table(result.table().iloc[1:])
    return text


def markdown(df) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None or v != v else str(v) for v in row) + " |")
    return "\n".join(lines)


def format_table(df, fmt: str = "table") -> str:
    """A DataFrame as an aligned table, markdown or CSV."""
    import pandas as pd

    if fmt == "markdown":
        return markdown(df)
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        return df.to_string(index=False)


__all__ = ["summary_row", "describe", "headline", "markdown", "format_table", "render"]
