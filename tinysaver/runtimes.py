"""Run one model on a batch on an inference backend: eager PyTorch, torch.compile, ONNX Runtime or OpenVINO.

A :class:`Runner` maps a float (N, C, H, W) batch to (N, classes) logits, for any N: batch
shrinking changes the batch size at every cascade stage. ONNX Runtime and OpenVINO run an ONNX
export of the model, made once and cached under a key of the model's name, a sha256 of its
weights, its input size and the torch and runtime versions, so a later run loads it instead of
exporting again. Thread counts are set through each runtime's own options (ONNX Runtime's
``intra_op_num_threads``, OpenVINO's ``INFERENCE_NUM_THREADS``): torch's thread count unless the
caller gives one (a :class:`~tinysaver.cascade.Cascade` can give one per stage).

The runtimes are optional extras: ``pip install 'tinysaver[onnx]'`` and ``'tinysaver[openvino]'``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import BackendError  # noqa: F401 (re-exported)
from .models import LoadedModel
from .policy import confidence
from .zoo import BACKENDS  # noqa: F401 (re-exported)

_EXTRA = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}



@dataclass
class Runner:
    """One model on one backend. ``export_s`` is the time spent exporting (0 when the cache held it);
    ``threads`` is the intra-op thread count the runtime reports it uses, and ``spin`` whether its
    idle threads spin (ONNX Runtime only)."""

    key: str
    backend: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    export_path: Path | None = None
    export_s: float = 0.0
    cached: bool = False
    threads: int | None = None
    spin: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def expect_batch(self, n: int) -> None:
        """Most batches to come have ``n`` samples: a backend that runs faster on a fixed shape
        (OpenVINO) compiles for it now. Other batch sizes still run. A no-op elsewhere."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise BackendError(f"a batch size is an integer ≥ 1, got {n!r}")
        n = int(n)
        expect = getattr(self.fn, "expect_batch", None)
        if expect is not None:
            expect(n)


def check_backend(name: str) -> None:
    """Raise a one-line error when ``name`` is unknown or its runtime is not installed."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name in _EXTRA:
        module, extra = _EXTRA[name]
        if importlib.util.find_spec(module) is None:
            raise BackendError(f"backend {name!r} needs {module}: pip install 'tinysaver[{extra}]'")


def backend_version(name: str) -> str:
    if name in _EXTRA:
        return str(importlib.import_module(_EXTRA[name][0]).__version__)
    return str(torch.__version__)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes and bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def export_key(model: LoadedModel, backend: str) -> str:
    parts = [model.key, weights_sha256(model.module), "x".join(map(str, model.preprocess.input_size)),
             f"torch{torch.__version__}", f"{backend}{backend_version(backend)}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def default_cache_dir(model: LoadedModel) -> Path:
    """Next to the model's checkpoint when it has a writable one; else ``$TINYSAVER_CACHE`` or
    ``~/.cache/tinysaver``, under ``exports/``."""
    ck = model.source.get("checkpoint")
    if ck and Path(ck).is_file() and os.access(Path(ck).parent, os.W_OK):
        return Path(ck).parent / "exports"
    return Path(os.environ.get("TINYSAVER_CACHE", Path.home() / ".cache" / "tinysaver")) / "exports"


def export_onnx(model: LoadedModel, path: Path) -> None:
    """ONNX export with a dynamic batch axis, written atomically; a failure names the model and the op."""
    x = torch.zeros(2, *model.preprocess.input_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.module.eval(), (x,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        op = re.search(r"operator '([^']+)'", str(e))
        what = f"op {op.group(1)}" if op else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise BackendError(f"{model.key}: cannot export to ONNX ({what}); run this stage on eager with "
                           "--backend-fallback eager") from None
    os.replace(tmp, path)  # same folder: the rename is atomic


def _onnx_file(model: LoadedModel, backend: str, cache_dir: Path | None) -> tuple[Path, float, bool]:
    path = (cache_dir or default_cache_dir(model)) / f"{model.key.replace('/', '__')}-{export_key(model, backend)}.onnx"
    if path.is_file():
        return path, 0.0, True
    # the first export of a model takes seconds to a minute with nothing else to show for it
    print(f"tinysaver: exporting {model.key} for {backend} once (cached at {path})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    export_onnx(model, path)
    return path, time.perf_counter() - t0, False


def model_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def make_runner(model: LoadedModel, backend: str = "eager", cache_dir: Path | None = None,
                threads: int | None = None, spin: bool = False) -> Runner:
    """A :class:`Runner` for ``model`` on ``backend`` (exporting once, then reusing the cached file).

    ``spin`` (ONNX Runtime only) lets idle intra-op threads spin, as ONNX Runtime does by default.
    That is faster for a model run alone, but in a cascade the spinning threads compete with the
    next stage for the cores, so it is off unless asked for (benchmarks/RESULTS.md measures both).
    """
    check_backend(backend)
    if spin and backend != "onnxruntime":
        raise BackendError(f"spin applies to the onnxruntime backend only, not {backend!r}")
    threads = threads or torch.get_num_threads()
    module = model.module.eval()
    if backend == "eager":
        return Runner(model.key, backend, module, threads=torch.get_num_threads())
    if backend == "compile":
        compiled = torch.compile(module, dynamic=True)
        # torch.compile works on first call; compile now, so that the time is reported as export
        # time and no request pays it. Batch 1 is specialised apart from the dynamic batch axis, and
        # batch shrinking reaches it often, so both shapes are compiled.
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in (2, 1):
                compiled(torch.zeros(n, *model.preprocess.input_size, device=model_device(module)))
        return Runner(model.key, backend, compiled, export_s=time.perf_counter() - t0, threads=torch.get_num_threads())
    path, secs, cached = _onnx_file(model, backend, cache_dir)
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle intra-op threads spin by default; in a cascade the next stage (another session, or
        # torch) then competes with them for the cores, which made every ratio noisy on 2 cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run_ort(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])

        used = session.get_session_options()
        return Runner(model.key, backend, run_ort, path, secs, cached, used.intra_op_num_threads,
                      used.get_session_config_entry("session.intra_op.allow_spinning") == "1")
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        # measured here: OpenVINO 2026.4 aborts with "double free or corruption" on its first
        # inference when tcmalloc is preloaded, even without torch in the process
        raise BackendError(f"{model.key}: OpenVINO crashes when tcmalloc is preloaded (LD_PRELOAD); run OpenVINO "
                           "stages without it, or use --backend onnxruntime")
    ov_model = OpenVinoModel(path, model.preprocess.input_size, threads)
    return Runner(model.key, backend, ov_model, path, secs, cached, ov_model.threads)


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU: (N, C, H, W) float → (N, classes) logits, any N.

    Batches run on one dynamic-batch compiled model, except batch sizes announced with
    :meth:`expect_batch` (a cascade announces its batch size, the profiler each one it times), which
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


def runner_with_fallback(model: LoadedModel, backend: str, fallback: str | None = None,
                         cache_dir: Path | None = None, threads: int | None = None, spin: bool = False) -> Runner:
    """:func:`make_runner`, falling back to ``fallback`` (only "eager") for this model when its export fails."""
    if fallback not in (None, "eager"):
        raise BackendError(f"the only fallback backend is eager, got {fallback!r}")
    try:
        return make_runner(model, backend, cache_dir, threads, spin)
    except BackendError as e:
        if fallback is None or "cannot export" not in str(e):
            raise
        warnings.warn(f"{e}; running {model.key} on eager as --backend-fallback asks")
        return make_runner(model, "eager")


def _classify(fn, model: LoadedModel, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class, max-softmax confidence) of ``fn`` on decoded uint8 ``images``."""
    from .data import take_images
    from .transforms import prepare_batch

    preds, confs = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = prepare_batch(take_images(images, range(s, min(s + batch_size, len(images)))), model.preprocess)
            c, p = confidence(fn(x))
            preds.append(p.numpy())
            confs.append(c.numpy())
    return np.concatenate(preds), np.concatenate(confs)


def _compare(pred, conf, ref_pred, ref_conf) -> dict:
    return {"top1_agreement": round(float((pred == ref_pred).mean()), 6),
            "max_conf_diff": float(np.abs(conf - ref_conf).max()), "samples": len(pred)}


def agreement(model: LoadedModel, runner: Runner, images, batch_size: int = 64) -> dict[str, float]:
    """How closely ``runner`` reproduces eager on decoded ``images``: the share of samples with the
    same top-1 class, and the largest max-softmax confidence difference."""
    return _compare(*_classify(runner, model, images, batch_size), *_classify(model.module, model, images, batch_size))


def agreement_with_predictions(model: LoadedModel, runner: Runner, data, stored, batch_size: int = 256) -> dict:
    """Agreement of ``runner`` with eager predictions stored in a zoo (``stored``: Predictions of the
    same split), on the samples of ``data`` (a DecodedSet, possibly the split's first N samples)."""
    n = len(data)
    if list(data.ids) != [str(i) for i in stored.ids[:n]]:
        raise BackendError(f"{model.key}: the decoded samples are not the ones the zoo recorded (ids differ)")
    return _compare(*_classify(runner, model, data.images, batch_size), stored.pred[:n], stored.conf[:n])


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def malloc_advice(batch_size: int, input_sides: list[int], device: str = "cpu",
                  backends: list[str] | None = None) -> str | None:
    """A hint when glibc's malloc will slow this run down, else None.

    Large images allocate activation buffers of MBs (tens of MB in a batch); glibc serves them
    from fresh mmap'd pages and the page faults cost more than the arithmetic. On the project's
    2-core VM (benchmarks/bench_allocator.py, tf_efficientnet_lite0 at 224 px) tcmalloc, which
    keeps those pages, ran 1.9× faster at batch 1 and 2.4× at batch 32, and 24–54 % of the CPU time
    in the kernel fell to 0–1 %. jemalloc lost at batch 32.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if device != "cpu" or max(input_sides, default=0) < 160 or "malloc" in preload or "openvino" in (backends or []):
        return None  # (OpenVINO crashes under tcmalloc, see make_runner)
    how = (f"LD_PRELOAD={TCMALLOC}" if Path(TCMALLOC).is_file()
           else "apt-get install -y libtcmalloc-minimal4, then LD_PRELOAD=" + TCMALLOC)
    return (f"{max(input_sides)} px images on CPU spend much of their time in page faults under glibc's malloc "
            f"(batch {batch_size}); run with {how}: measured 1.9-2.4x faster (benchmarks/RESULTS.md)")


__all__ = ["BACKENDS", "BackendError", "Runner", "make_runner", "runner_with_fallback", "check_backend",
           "agreement", "agreement_with_predictions", "malloc_advice", "weights_sha256", "export_key",
           "default_cache_dir"]
