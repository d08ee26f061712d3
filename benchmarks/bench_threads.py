"""Batch-1 time of each Fashion-MNIST model on ONNX Runtime and OpenVINO, on 1 and on 2 intra-op threads.

    python benchmarks/bench_threads.py

Per model and runtime: ms per call on one prepared image, best of 3 runs of 300 calls after 20
warm-up calls; the ratio 2 threads / 1 thread says whether a second thread pays at batch 1.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tinysaver.data import load_dataset
from tinysaver.decoding import take_images
from tinysaver.runtimes import make_runner
from tinysaver.transforms import prepare_batch
from tinysaver.zoo import load_zoo
from common import table_head


def ms_per_call(fn, inputs, calls: int = 300) -> float:
    for i in range(20):
        fn(inputs[i % len(inputs)])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(inputs[i % len(inputs)])
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def main() -> int:
    zoo = load_zoo("fashion-mnist")
    imgs = load_dataset(zoo.splits["test"]["source"], progress=False, limit=200).images
    table_head("| model | input | runtime | 1 thread ms | 2 threads ms | 2 / 1 |")
    for key in zoo.models:
        m = zoo.load_model(key)
        xs = [prepare_batch(take_images(imgs, np.array([i])), m.preprocess) for i in range(len(imgs))]
        for backend in ("onnxruntime", "openvino"):
            with torch.inference_mode():
                one, two = (ms_per_call(make_runner(m, backend, threads=t), xs) for t in (1, 2))
            print(f"| {key} | {m.preprocess.input_size[-1]} px | {backend} | {one:.3f} | {two:.3f} | {two / one:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
