"""Classify image files, folders and tars through a cascade: the library side of ``tinysaver infer``.

`open_files` does everything before the first image (the policy, the stage plan, the models, the
file list, the input budget) and returns a `FileRun` whose `FileRun.rows` streams the answers and
`FileRun.write` writes them as CSV or JSON lines. The command only prints what it is given.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TextIO

import torch
from tqdm.auto import tqdm

from .backends import DEFAULT_BACKEND
from .budget import InputBudget
from .cascade import Cascade, FileTally, classify_files
from .errors import UsageError
from .limits import MAX_PIXELS
from .report import describe
from .runtimes import malloc_advice
from .policy import Selection
from .selector import PolicyRequest, selection_for
from .sources import paths_source
from .stageplan import DEFAULT_BATCH_SIZE, StagePlan, resolve
from .zoo import Zoo

ROW_FIELDS = ("path", "class", "name", "confidence", "exit_stage", "stage_name")  # a CSV row, in order


def torch_threads(given: Sequence[int] | None) -> tuple[int, str | None]:
    """The thread count for torch's pool (eager stages) and, when it was lowered, why (one line).

    ``given``: ``--threads``; one number is used as it is. Otherwise the cores this process may use
    (``os.sched_getaffinity``), or 1 on a machine already busier than that: measured on a loaded
    2-core machine, torch's default ran at 19-46 img/s against about 800 on one thread. The count
    is set on torch unless ``given`` names one per stage."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = None
    if given and len(given) == 1:
        n = given[0]
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        n = 1 if load >= cores else cores
        if n < cores:
            why = (f"the machine is busy (load {load:.1f} on {cores} cores), so eager stages run on 1 thread; "
                   "give --threads N to choose")
    if not given or len(given) == 1:
        torch.set_num_threads(n)
    return n, why


@dataclass
class FileRun:
    """A cascade ready to classify the files found. ``warnings``: lines always worth showing (files
    skipped, links followed); ``notes``: lines a quiet run may drop (the policy, memory advice)."""

    selection: Selection
    plan: StagePlan
    cascade: Cascade
    source: object
    budget: InputBudget
    batch_size: int
    refill: bool = True
    pipeline: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tally: FileTally = None

    def __post_init__(self):
        self.tally = self.tally or FileTally(self.cascade.stage_names)

    def rows(self) -> Iterator[tuple[str, dict | str]]:
        """``(path, row)`` per image answered (`CascadeResult.rows`' dict) and ``(path, reason)``
        per file that could not be read, as `tinysaver.cascade.classify_files` streams them."""
        return classify_files(self.cascade, self.source, self.budget, self.batch_size, refill=self.refill,
                              pipeline=self.pipeline, tally=self.tally)

    def write(self, out: TextIO, fmt: str = "csv", log: TextIO | None = None, progress: bool = True) -> int:
        """Stream `rows` to ``out`` as CSV (a header, then `ROW_FIELDS` per image) or JSON lines;
        each unreadable file is one line on ``log`` instead. ``progress``: a bar on ``log`` past 200
        files. Returns the number of images answered."""
        if fmt not in ("csv", "jsonl"):
            raise UsageError(f"format must be csv or jsonl, not {fmt!r}")
        log = log or sys.stderr
        writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if writer:
            writer.writerow(ROW_FIELDS)
        # the bar counts answered images (and unreadable ones), not decoded ones: decoding runs ahead
        n = len(self.source.ids)
        with tqdm(total=n, desc="infer", unit="img", disable=n < 200 or not progress, file=log) as bar:
            for path, row in self.rows():
                bar.update(1)
                if isinstance(row, str):
                    print(f"tinysaver: cannot read {path}: {row}", file=log)
                elif writer:
                    writer.writerow([path, row["class"], row["name"] or "", f"{row['confidence']:.6f}",
                                     row["exit_stage"], row["stage_name"]])
                else:
                    print(json.dumps({"path": path, **row}), file=out)
        return self.tally.answered

    def summary(self) -> dict:
        """The run's counts and figures (`FileTally.summary`), with the policy and backends used."""
        return {**self.tally.summary(), "skipped": len(self.source.skipped),
                "links_followed": len(self.source.followed), "thresholds": self.selection.thresholds,
                "backends": self.cascade.backends, "pipeline": self.pipeline}


def open_files(zoo: Zoo, request: PolicyRequest, paths: Sequence[str | os.PathLike], *,
               backend: str | Sequence[str] = DEFAULT_BACKEND, device: str = "cpu",
               batch_size: int = DEFAULT_BATCH_SIZE, threads: Sequence[int] | None = None,
               backend_fallback: str | None = None, accept_preprocess_change: bool = False,
               max_pixels: int = MAX_PIXELS, refill: bool = True, pipeline: bool = False) -> FileRun:
    """Resolve ``request`` over ``zoo``, load its stages and list the images under ``paths``.

    ``threads``: one count for every stage, or one per onnxruntime/openvino stage (see
    `torch_threads`). An image over ``max_pixels`` (width × height, or after any stage's resize,
    read from its header) is refused and counted. Raises `UsageError` when no image is found."""
    sel = selection_for(zoo, request)
    shared, lowered = torch_threads(threads)
    plan = resolve(sel, zoo, backend=backend, device=device, batch_size=batch_size, backend_fallback=backend_fallback,
                   accept_preprocess_change=accept_preprocess_change,
                   threads=shared if threads is None or len(threads) == 1 else list(threads))
    src = paths_source(paths)
    if not src.ids:
        skipped = f"; skipped {len(src.skipped)}, first: {src.skipped[0]}" if src.skipped else ""
        raise UsageError("no images found in the given paths (looked for .jpg, .jpeg, .png, .bmp, .webp, .gif, "
                         f".tif files, folders and .tar files){skipped}")
    cascade = Cascade.from_plan(plan, zoo=zoo)
    advice = malloc_advice(batch_size, [m.preprocess.input_size[-1] for m in cascade.stages], device,
                           cascade.backends)
    return FileRun(sel, plan, cascade, src, InputBudget(max_pixels, plan.preprocess), batch_size, refill, pipeline,
                   warnings=[f"skipped {reason}" for reason in src.skipped]
                   + [f"note: followed the link {link}" for link in src.followed],
                   notes=[line for line in (lowered and f"note: {lowered}", describe(sel), advice and f"note: {advice}")
                          if line])


__all__ = ["ROW_FIELDS", "torch_threads", "FileRun", "open_files"]
