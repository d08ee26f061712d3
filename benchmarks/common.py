"""What the benchmarks share, written once: their command-line options and their tables' header.

A benchmark runs as a script (``python benchmarks/bench_x.py``), so it imports this module by its
own name, as it imports `loadgen` (the serving benchmarks' service start and clients).
"""
from __future__ import annotations

import argparse


def parser(zoo: str = "fashion-mnist", description: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser with ``--zoo`` (default ``zoo``), the option every benchmark has."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--zoo", default=zoo, help=f"a bundled zoo's name or a zoo folder (default: {zoo})")
    return ap


def serve_load_options(ap: argparse.ArgumentParser, requests: int) -> argparse.ArgumentParser:
    """The serving benchmarks' load and batching options: the base served, the split its images
    come from, ``requests`` per run, the client concurrencies and the batcher's settings."""
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--split", default="test")
    ap.add_argument("--requests", type=int, default=requests, help="requests per run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    return ap


def table_head(header: str) -> None:
    """Print a Markdown table's ``header`` (``"| a | b |"``, a leading newline kept) and the rule under
    it, with as many columns as the header has; RESULTS.md takes the rows as they are printed."""
    print(header, flush=True)
    print("|" + "---|" * (header.strip().count("|") - 1), flush=True)


__all__ = ["parser", "serve_load_options", "table_head"]
