"""Shared decode vs decoding once per model, on the real ImageNet sample and the lite models' transforms.

    python benchmarks/bench_decode.py [--images 300]

The profiler decodes each image once and derives every model's input from that tensor; the
baseline re-reads and re-decodes the file for every model, as a per-model DataLoader would.
Only the data path is timed (no forward passes), since that is what sharing saves.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tinysaver.decoding import RawSource, decode_all
from tinysaver.sources import imagenet_source
from tinysaver.models import create_model
from tinysaver.transforms import prepare_batch

TAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample-1000.tar"
MODELS = ["tf_efficientnet_lite0.pypi_in1k", "tf_efficientnet_lite1.pypi_in1k", "tf_efficientnet_lite2.pypi_in1k"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()
    src = imagenet_source(TAR)
    src = RawSource(src.name, src.ids[:args.images], src.labels[:args.images], src.read)
    pres = [create_model(m).preprocess for m in MODELS]

    def shared():
        ds = decode_all(src, progress=False)
        for pre in pres:
            for s in range(0, len(ds), args.batch_size):
                prepare_batch(ds.images[s:s + args.batch_size], pre)

    def per_model():
        for pre in pres:
            ds = decode_all(src, progress=False)
            for s in range(0, len(ds), args.batch_size):
                prepare_batch(ds.images[s:s + args.batch_size], pre)

    def best(fn, reps=3):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    a, b = best(shared), best(per_model)
    print(f"{args.images} ImageNet images, {len(MODELS)} models' transforms")
    print(f"shared decode: {a:.2f} s; decode per model: {b:.2f} s; saving {100 * (1 - a / b):.1f}% ({b / a:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
