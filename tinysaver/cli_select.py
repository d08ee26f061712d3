"""CLI commands of the selector and the cascade: query, select, plot, infer."""
from __future__ import annotations

import argparse
from pathlib import Path


def _zoo(args):
    from .zoo import load_zoo

    return load_zoo(args.zoo, Path(args.root) if args.root else None)


def _cfg(args):
    from .selector import SelectorConfig

    return SelectorConfig(criterion=args.criterion, tolerance=args.tolerance, delta=args.delta, cost=args.cost,
                          label_free=args.label_free, max_stages=args.max_stages, calib_split=args.calib_split,
                          test_split=args.test_split, seed=args.seed)


def _fmt_cost(x: float, metric: str) -> str:
    return f"{x / 1e9:.4f} GFLOPs" if metric == "flops" else f"{x:.4f} ms/img"


def describe(sel) -> str:
    """Human-readable answer to 'which saver, at what confidence?'."""
    lines = [f"base: {sel.base}  (zoo {sel.zoo}, criterion {sel.criterion}"
             + (f", ε={sel.tolerance} pts" if sel.criterion in ("bounded", "guaranteed") else "")
             + (f", δ={sel.delta}" if sel.delta is not None else "")
             + f", target {sel.target})"]
    if not sel.found:
        lines.append(sel.message)
    else:
        chain = " → ".join(f"{s.model} (conf ≥ {s.threshold:.4f})" for s in sel.savers)
        lines.append(f"saver: {chain} → {sel.base}")
        lines.append("exit ratio: " + ", ".join(f"{r:.1%}" for r in sel.exit_ratio_calib[:-1])
                     + f" on {sel.calib_split}")
    lines.append(f"cost: {_fmt_cost(sel.cost_base, sel.cost_metric)} → {_fmt_cost(sel.cost_cascade, sel.cost_metric)}"
                 f"  (saving {sel.saving_pct:.1f}%)")
    lines.append(f"accuracy on {sel.calib_split} (calibration): {100 * sel.acc_base_calib:.2f}% → "
                 f"{100 * sel.acc_cascade_calib:.2f}%")
    if sel.test_split is not None:
        lines.append(f"accuracy on {sel.test_split} (held out):    {100 * sel.acc_base_test:.2f}% → "
                     f"{100 * sel.acc_cascade_test:.2f}%")
    return "\n".join(lines)


def cmd_query(args) -> int:
    from .cli import _print_df
    from .selector import select

    zoo = _zoo(args)
    sel, table = select(zoo, args.base, _cfg(args), savers=args.saver, top=args.top)
    print(describe(sel))
    if len(table) > 1:
        print("\nnext best candidates (calibration split):")
        _print_df(table.iloc[1:])
    if args.save:
        import json

        Path(args.save).write_text(json.dumps(sel.to_dict(), indent=2))
        print(f"selection saved to {args.save}")
    return 0


def cmd_select(args) -> int:
    from .cli import _markdown, _print_df
    from .selector import select_all
    from .zoo import atomic_write_bytes

    zoo = _zoo(args)
    _, table = select_all(zoo, _cfg(args))
    _print_df(table)
    out = Path(args.out) if args.out else None
    if out:
        atomic_write_bytes(out.with_suffix(".csv"), table.to_csv(index=False).encode())
        atomic_write_bytes(out.with_suffix(".md"), (_markdown(table) + "\n").encode())
        print(f"written {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_pair

    path = plot_pair(_zoo(args), args.base, args.saver, args.out, _cfg(args))
    print(f"plot written to {path}")
    return 0


def _add_selector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default="fashion-mnist")
    p.add_argument("--criterion", choices=["zero", "bounded", "subset", "guaranteed"], default="zero")
    p.add_argument("--tolerance", type=float, default=0.0, help="ε, allowed accuracy loss in points (1.0 = 1%%)")
    p.add_argument("--delta", type=float, default=0.1, help="δ of the guaranteed criterion")
    p.add_argument("--cost", default="flops", help="flops or latency:DEVICE:bsN, e.g. latency:cpu:bs1")
    p.add_argument("--label-free", action="store_true", help="use agreement with the base instead of labels")
    p.add_argument("--max-stages", type=int, default=3, help="3+ also searches chains of savers")
    p.add_argument("--calib-split")
    p.add_argument("--test-split")
    p.add_argument("--seed", type=int, default=0, help="seed of the half/half split when the zoo has one split")


def register(sub) -> None:
    q = sub.add_parser("query", help="best saver and threshold for one base model")
    _add_selector_args(q)
    q.add_argument("--base", required=True)
    q.add_argument("--saver", action="append", help="restrict candidates to these savers")
    q.add_argument("--top", type=int, default=5)
    q.add_argument("--save", help="write the selection as JSON (input of 'tinysaver infer --from-selection')")
    q.set_defaults(func=cmd_query)

    s = sub.add_parser("select", help="whole-zoo table: best saver of every base")
    _add_selector_args(s)
    s.add_argument("--out", help="path stem for the .csv and .md tables")
    s.set_defaults(func=cmd_select)

    pl = sub.add_parser("plot", help="accuracy vs early-exit ratio and the cost/accuracy Pareto front (PNG)")
    _add_selector_args(pl)
    pl.add_argument("--base", required=True)
    pl.add_argument("--saver", required=True)
    pl.add_argument("--out", default="tinysaver-plot.png")
    pl.set_defaults(func=cmd_plot)

    from . import cli_infer

    cli_infer.register(sub)
