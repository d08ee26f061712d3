"""Peak memory of decoding and preprocessing hostile image shapes under the input budget.

    python benchmarks/bench_input_budget.py

Each shape runs in a fresh subprocess (so each peak is its own), which decodes the PNG with the
budget of an ImageNet 224-pixel model and a Fashion 32-pixel one (``tinysaver.budget.InputBudget``,
the default 40-megapixel cap) and, when it is let through, prepares it for both models. Printed:
what happened and the growth of the peak RSS over the same process after a warm-up image. The
baseline is a 256 × 256 photo-sized image through the same path in the same run. Before the budget
(issue 34), 100000 × 1 made preprocessing allocate until the OOM killer ended the process at 23.2 GB.
"""
from __future__ import annotations

import io
import subprocess
import sys

from common import table_head

SHAPES = [(256, 256), (100000, 1), (1, 100000), (65535, 2), (12000, 12000), (20000, 20000), (610, 1), (6000, 6000)]

PROBE = r"""
import io, resource, sys
from PIL import Image
from tinysaver.budget import InputBudget
from tinysaver.decoding import decode_image
from tinysaver.errors import PixelCapError
from tinysaver.models import Preprocess
from tinysaver.transforms import prepare_batch
pres = (Preprocess(), Preprocess((1, 32, 32), 1.0, "bilinear", (0.286,), (0.353,)))
budget = InputBudget(preprocess=pres)
warm = io.BytesIO(); Image.new("RGB", (300, 200)).save(warm, "PNG")
prepare_batch([decode_image(warm.getvalue(), budget)], pres[0])
data = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    img = decode_image(data, budget)
    for p in pres:
        prepare_batch([img], p)
    what = "processed"
except PixelCapError as e:
    what = "refused (413)"
print(what, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for w, h in SHAPES:
            path = f"{d}/{w}x{h}.png"
            data = png(w, h)
            with open(path, "wb") as f:
                f.write(data)
            out = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, timeout=600)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            what, mb = out.stdout.strip().rsplit(" ", 1)
            rows.append((w, h, len(data), what, float(mb)))
            print(f"{w} × {h}: {what}, peak RSS +{float(mb):.1f} MB", flush=True)
    base = rows[0][4]
    table_head("\n| image | file bytes | outcome | peak RSS growth MB | vs. a 256 × 256 image |")
    for w, h, n, what, mb in rows:
        print(f"| {w} × {h} | {n:,} | {what} | {mb:.1f} | {mb / base if base > 0 else float('nan'):.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
