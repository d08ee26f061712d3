"""Draw the opening plot of each results page from a table that page records.

    python benchmarks/plot_results.py [--pages in-process,guarantees,soak,defer,zoo]

Each plot reads one table from its page (`docs/results/<page>.md`, the section and the table named
below), as the benchmark printed it there, and writes `docs/results/img/<page>.png`. Nothing is
measured here: the figures are those of the run whose command the section shows.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

# page: (section heading, which table of the section (0 = first), x column, y columns, kind, title, y label)
PLOTS = {
    "in-process": ("Cascade throughput on real ImageNet weights", 1, "batch", ["base img/s", "cascade img/s"], "bar",
                   "Fashion-MNIST, resnet10t behind mobilenetv3_small_075, one process", "images per second"),
    "guarantees": ("Guaranteed selection against MAPIE's Learn-then-Test", 1, "method", ["mean exit ratio"], "bar",
                   "Fashion-MNIST: exits certified at ε = 1 point, δ = 0.1 (200 draws)", "mean exit ratio, %"),
    "soak": ("The soak with slow bodies and heavy legal images (the boundary's hostile mix)", 1, "minute",
             ["p50 ms", "p99 ms"], "line", "Ten minutes at concurrency 16, 2 % hostile requests", "latency, ms"),
    "defer": ("α over a small grid, resnet10t", 0, "variant", ["zero_exit_test", "guaranteed_exit_test"], "bar",
              "resnet10t's saver, plain and fine-tuned to defer", "exits on test, %"),
    "zoo": ("Profiling on Ray against the local profiler, one machine", 0, "backend", ["wall s (median of 3)"], "bar",
            "8 models × 10,000 images, one machine", "wall seconds"),
}


def section(text: str, heading: str) -> str:
    m = re.search(rf"^###? {re.escape(heading)}\n(.*?)(?=^###? |\Z)", text, re.S | re.M)
    if not m:
        raise SystemExit(f"no section '{heading}'")
    return m.group(1)


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` (also inside code blocks), as rows of cells, header first."""
    out, rows = [], []
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            out.append(rows)
            rows = []
    return out


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.eE+-]", "", cell.replace("×", "")))


def draw(page: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heading, which, x, ys, kind, title, ylabel = PLOTS[page]
    table = tables(section((RESULTS / f"{page}.md").read_text(), heading))[which]
    head, body = table[0], table[1:]
    xs = [r[head.index(x)] for r in body]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for i, y in enumerate(ys):
        vals = [number(r[head.index(y)]) for r in body]
        if kind == "bar":
            w = 0.8 / len(ys)
            ax.bar([j + (i - (len(ys) - 1) / 2) * w for j in range(len(xs))], vals, width=w, label=y)
        else:
            ax.plot(range(len(xs)), vals, marker="o", label=y)
    ax.set_xticks(range(len(xs)), xs, rotation=20 if max(map(len, xs)) > 8 else 0, ha="right" if
                  max(map(len, xs)) > 8 else "center", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(ys) > 1:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = RESULTS / "img" / f"{page}.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default=",".join(PLOTS), help="which pages' plots to draw")
    for page in ap.parse_args().pages.split(","):
        print(f"{page}: plot written to {draw(page).relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
