"""ONNX Runtime on the CPU, running the model's cached ONNX export."""
from __future__ import annotations

import torch

from . import Runner, register_backend
from ._export import onnx_file


@register_backend("onnxruntime", needs=("onnxruntime", "onnx"), exports_onnx=True, spins=True, light_calls=True)
def build(model, cache_dir=None, threads=None, spin=False) -> Runner:
    import onnxruntime as ort

    path, secs, cached = onnx_file(model, "onnxruntime", cache_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # idle intra-op threads spin by default; in a cascade the next stage (another session, or
    # torch) then competes with them for the cores, which made every ratio noisy on 2 cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])

    used = session.get_session_options()
    return Runner(model.key, "onnxruntime", run, path, secs, cached, used.intra_op_num_threads,
                  used.get_session_config_entry("session.intra_op.allow_spinning") == "1")


__all__ = ["build"]
