"""The ONNX export that the ONNX Runtime and OpenVINO backends share: made once, cached by key.

The key covers the model's name, a sha256 of its weights, its input size and the torch and
runtime versions, so a later run (``infer``, ``profile`` or a served stage) loads the file instead
of exporting again.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch


from . import DEFAULT_BACKEND, ExportError, get_backend

if TYPE_CHECKING:
    from ..models import LoadedModel


def backend_version(name: str) -> str:
    needs = get_backend(name).needs
    return str(importlib.import_module(needs[0]).__version__) if needs else str(torch.__version__)


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
    """``exports/`` in ``$TINYSAVER_CACHE``, else the user cache folder (``~/.cache/tinysaver`` on
    Linux): never beside a checkpoint, which may lie in site-packages or a source checkout. An
    export's file name holds its key, so one cache serves every zoo."""
    import platformdirs

    return Path(os.environ.get("TINYSAVER_CACHE") or platformdirs.user_cache_dir("tinysaver", appauthor=False)) / "exports"


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
        raise ExportError(f"{model.key}: cannot export to ONNX ({what}); run this stage on {DEFAULT_BACKEND} with "
                          f"--backend-fallback {DEFAULT_BACKEND}") from None
    os.replace(tmp, path)  # same folder: the rename is atomic


def onnx_file(model: LoadedModel, backend: str, cache_dir: Path | None) -> tuple[Path, float, bool]:
    path = (cache_dir or default_cache_dir(model)) / f"{model.key.replace('/', '__')}-{export_key(model, backend)}.onnx"
    if path.is_file():
        return path, 0.0, True
    # the first export of a model takes seconds to a minute with nothing else to show for it
    print(f"tinysaver: exporting {model.key} for {backend} once (cached at {path})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    export_onnx(model, path)
    return path, time.perf_counter() - t0, False


__all__ = ["backend_version", "weights_sha256", "export_key", "default_cache_dir", "export_onnx", "onnx_file"]
