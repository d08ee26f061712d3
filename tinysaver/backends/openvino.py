"""OpenVINO on the CPU, running the model's cached ONNX export."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from . import Runner, register_backend
from ._export import onnx_file


@register_backend("openvino", needs=("openvino", "openvino"), exports_onnx=True, fixed_shapes=True, tcmalloc_safe=False)
def build(model, cache_dir=None, threads=None, spin=False) -> Runner:
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        # measured here: OpenVINO 2026.4 aborts with "double free or corruption" on its first
        # inference when tcmalloc is preloaded, even without torch in the process
        raise BackendError(f"{model.key}: OpenVINO crashes when tcmalloc is preloaded (LD_PRELOAD); run OpenVINO "
                           "stages without it, or use --backend onnxruntime")
    path, secs, cached = onnx_file(model, "openvino", cache_dir)
    ov_model = OpenVinoModel(path, model.preprocess.input_size, threads or torch.get_num_threads())
    return Runner(model.key, "openvino", ov_model, path, secs, cached, ov_model.threads)


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU: (N, C, H, W) float → (N, classes) logits, any N.

    Batches run on one dynamic-batch compiled model, except batch sizes announced with
    `expect_batch` (a cascade announces its batch size, the profiler each one it times), which
    run on a model compiled for that fixed shape: 1.02–1.45× faster on the Fashion-MNIST zoo, with
    the same logits (benchmarks/bench_openvino.py). A compile takes 80–190 ms, so it happens when
    a size is announced, never in the middle of a stream of batches. The ``max_static`` most
    recently announced sizes are kept.
    """

    def __init__(self, path: Path, input_size: tuple[int, int, int], threads: int, max_static: int = 4):
        import openvino as ov

        self.core, self.path, self.input_size = ov.Core(), Path(path), tuple(input_size)
        # Pinning puts each compiled model's threads on fixed cores. A cascade runs several compiled
        # models (and torch) in one process, and pinned 1-thread models then share one core:
        # two resnet10t models in two threads ran slower than one after the other (bench_openvino.py).
        self.config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                       "ENABLE_CPU_PINNING": False}
        self.max_static = max_static
        self.dynamic = self._compile(None)
        self.static: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        return int(self.dynamic.get_property("INFERENCE_NUM_THREADS"))

    def _compile(self, batch: int | None):
        graph = self.core.read_model(str(self.path))
        if batch is not None:
            graph.reshape([batch, *self.input_size])
        return self.core.compile_model(graph, "CPU", self.config)

    def expect_batch(self, n: int) -> None:
        """Compile for batch size ``n`` now (once), so that its batches run on a fixed-shape model."""
        with self._lock:  # a served model may be called from several threads
            if n in self.static:
                self.static.move_to_end(n)
                return
            self.static[n] = self._compile(n)
            while len(self.static) > self.max_static:
                self.static.popitem(last=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model = self.static.get(len(x), self.dynamic)
        return torch.from_numpy(np.asarray(model(x.detach().cpu().numpy())[0]))


__all__ = ["build", "OpenVinoModel"]
