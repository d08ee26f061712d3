"""What it costs to prepare each zoo model for a backend: torch.compile against an ONNX export.

    rm -rf /tmp/torchinductor_$USER && python benchmarks/compile_time.py --zoo fashion-mnist

For each model, ``make_runner(model, "compile")`` (which compiles for batch 2 and batch 1) and an
ONNX Runtime export into an empty temporary cache, one after the other; both report
``Runner.export_s``. Prints the seconds and their ratio. Empty the inductor cache first, or the
compile figures are cache hits.
"""
from __future__ import annotations

import resource
import tempfile
from pathlib import Path

from tinysaver.runtimes import make_runner
from tinysaver.zoo import load_zoo
from common import parser, table_head


def main() -> int:
    ap = parser("fashion-mnist")
    args = ap.parse_args()
    zoo = load_zoo(args.zoo)
    table_head("| model | compile s (batch 2 and 1) | ONNX export s | compile / export |")
    totals = [0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for key in zoo.models:
            model = zoo.load_model(key)
            c = make_runner(model, "compile").export_s
            e = make_runner(model, "onnxruntime", cache_dir=Path(tmp)).export_s
            totals[0] += c
            totals[1] += e
            print(f"| {key} | {c:.1f} | {e:.1f} | {c / e:.0f}× |", flush=True)
    print(f"| total | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.0f}× |")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
