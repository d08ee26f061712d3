"""Run one model on a batch on an inference backend: eager PyTorch, torch.compile, ONNX Runtime or OpenVINO.

A `Runner` maps a float (N, C, H, W) batch to (N, classes) logits, for any N: batch
shrinking changes the batch size at every cascade stage. The backends are registered in
`tinysaver.backends`, one module each. ONNX Runtime and OpenVINO run an ONNX export of the
model, made once and cached (`tinysaver.backends._export`). Thread counts are set through
each runtime's own options (ONNX Runtime's ``intra_op_num_threads``, OpenVINO's
``INFERENCE_NUM_THREADS``): torch's thread count unless the caller gives one (a
`Cascade` can give one per stage).

The runtimes are optional extras: ``pip install 'tinysaver[onnx]'`` and ``'tinysaver[openvino]'``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .backends import (BACKENDS, DEFAULT_BACKEND, ExportError, Runner, backends_that, check_backend,  # noqa: F401
                       get_backend)
from .backends._export import (backend_version, default_cache_dir, export_key, export_onnx,  # noqa: F401 (re-exported)
                               weights_sha256)
from .errors import BackendError
from .models import LoadedModel, model_device  # noqa: F401 (re-exported)
from .policy import confidence


def make_runner(model: LoadedModel, backend: str = DEFAULT_BACKEND, cache_dir: Path | None = None,
                threads: int | None = None, spin: bool = False) -> Runner:
    """A `Runner` for ``model`` on ``backend`` (exporting once, then reusing the cached file).

    ``spin`` (ONNX Runtime only) lets idle intra-op threads spin, as ONNX Runtime does by default.
    That is faster for a model run alone, but in a cascade the spinning threads compete with the
    next stage for the cores, so it is off unless asked for (benchmarks/RESULTS.md measures both).
    """
    b = check_backend(backend)
    if spin and not b.spins:
        raise BackendError(f"spin applies to the {' and '.join(backends_that(spins=True))} backend only, "
                           f"not {backend!r}")
    return b.build(model, cache_dir, threads, spin)


def runner_with_fallback(model: LoadedModel, backend: str, fallback: str | None = None,
                         cache_dir: Path | None = None, threads: int | None = None, spin: bool = False) -> Runner:
    """`make_runner`, falling back to ``fallback`` (only the default backend, which runs the torch
    module itself) for this model when its export fails."""
    if fallback not in (None, DEFAULT_BACKEND):
        raise BackendError(f"the only fallback backend is {DEFAULT_BACKEND}, got {fallback!r}")
    try:
        return make_runner(model, backend, cache_dir, threads, spin)
    except ExportError as e:
        if fallback is None:
            raise
        warnings.warn(f"{e}; running {model.key} on {fallback} as --backend-fallback asks")
        return make_runner(model, fallback)


def _classify(fn, model: LoadedModel, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class, max-softmax confidence) of ``fn`` on decoded uint8 ``images``."""
    from .decoding import take_images
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
    unsafe = any(not get_backend(b).tcmalloc_safe for b in backends or [])
    if device != "cpu" or max(input_sides, default=0) < 160 or "malloc" in preload or unsafe:
        return None  # (OpenVINO crashes under tcmalloc, see make_runner)
    how = (f"LD_PRELOAD={TCMALLOC}" if Path(TCMALLOC).is_file()
           else "apt-get install -y libtcmalloc-minimal4, then LD_PRELOAD=" + TCMALLOC)
    return (f"{max(input_sides)} px images on CPU spend much of their time in page faults under glibc's malloc "
            f"(batch {batch_size}); run with {how}: measured 1.9-2.4x faster (benchmarks/RESULTS.md)")


__all__ = ["BACKENDS", "BackendError", "Runner", "make_runner", "runner_with_fallback", "check_backend",
           "agreement", "agreement_with_predictions", "malloc_advice", "weights_sha256", "export_key",
           "default_cache_dir", "backend_version", "export_onnx", "model_device"]
