"""Cost measurements of one model: FLOPs/MACs at its input size, and wall-clock latency.

Units: ``flops`` and ``macs`` are per single image (batch size 1); latency is milliseconds per
batch; throughput is images per second.
"""
from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import UsageError

# torch's benchmark timer imports its C++-extension helper, which logs "No CUDA runtime is found"
# once per process on a machine with a CUDA toolkit but no GPU: noise on every profile's stderr
# there, so it is held back for this one import (and the logger left as it was found)
_cpp_log = logging.getLogger("torch.utils.cpp_extension")
_cpp_level = _cpp_log.level
_cpp_log.setLevel(logging.ERROR)
try:
    from torch.utils import benchmark
finally:
    _cpp_log.setLevel(_cpp_level)


@dataclass(frozen=True)
class FlopCount:
    flops: int
    macs: int
    counter: str  # 'deepspeed' or 'torch'


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # (B, H, L, E) @ (B, H, E, S) then (B, H, L, S) @ (B, H, S, Ev): 2 FLOPs per MAC
    *batch, L, E = query_shape
    S = key_shape[-2]
    Ev = value_shape[-1]
    b = 1
    for d in batch:
        b *= d
    return 2 * b * L * S * E + 2 * b * L * S * Ev


def _sdpa_ops() -> list[Any]:
    aten = torch.ops.aten
    names = [
        "_scaled_dot_product_flash_attention_for_cpu",  # the CPU fused kernel torch counts as 0
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def flop_counter():
    """A torch FlopCounterMode that also counts the fused attention kernels (torch leaves CPU SDPA at 0)."""
    mapping = {op: (lambda q, k, v, *a, **kw: _sdpa_flops(q, k, v)) for op in _sdpa_ops()}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops_torch(module: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs of one image with `flop_counter`."""
    device = next(module.parameters()).device
    x = torch.randn(1, *input_shape[-3:], device=device)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        module(x)
    flops = int(counter.get_total_flops())
    return FlopCount(flops=flops, macs=flops // 2, counter="torch")


def count_flops_deepspeed(module: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """DeepSpeed's flops profiler at batch size 1 (the counter the TinySaver paper used)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.profiling.flops_profiler import get_model_profile

    device = next(module.parameters()).device
    with torch.inference_mode():
        flops, macs, _ = get_model_profile(
            module,
            args=[torch.randn(1, *input_shape[-3:], device=device)],
            print_profile=False,
            detailed=False,
            as_string=False,
        )
    return FlopCount(flops=int(flops), macs=int(macs), counter="deepspeed")


def count_flops(module: nn.Module, input_shape: Sequence[int], counter: str = "deepspeed") -> FlopCount:
    """FLOPs and MACs of one image; falls back to torch's counter when DeepSpeed is unavailable or fails."""
    if counter not in ("deepspeed", "torch"):
        raise UsageError(f"counter must be 'deepspeed' or 'torch', got {counter!r}")
    if counter == "deepspeed":
        try:
            return count_flops_deepspeed(module, input_shape)
        except Exception as e:  # import errors, unsupported ops: say so and use the other counter
            warnings.warn(f"DeepSpeed flops profiler failed ({type(e).__name__}: {e}); using torch's counter")
    return count_flops_torch(module, input_shape)


@dataclass(frozen=True)
class Latency:
    batch_size: int
    ms_per_batch: float  # median
    images_per_s: float
    repeats: int
    other_load: float | None = None  # cores' worth of CPU that other processes used while timing
    noisy: str | None = None         # why this figure is not to be trusted, when it is not


# A timing is re-measured when other processes kept more than this many cores' worth busy
# (measured from /proc/stat minus this process's own CPU time), and stored as noisy if they
# still did after the retries: in a trial beside another job, lite0 stored 353 ms at batch 1 against
# about 40 ms quiet, and the latency costs then picked the wrong saver (issue 18).
BUSY_CORES = 0.5
BUSY_RETRIES = 2


class LoadMeter:
    """CPU time the rest of the machine used between ``start()`` and ``stop()``, in cores."""

    def start(self) -> None:
        self._wall, self._own, self._total = time.perf_counter(), time.process_time(), _busy_seconds()

    def stop(self) -> float | None:
        wall = time.perf_counter() - self._wall
        own = time.process_time() - self._own
        total = _busy_seconds()
        if total is None or self._total is None or wall <= 0:
            return None
        return max(0.0, (total - self._total - own) / wall)


def _busy_seconds() -> float | None:
    """Seconds of CPU every process has used since boot (Linux /proc/stat: user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    v = [int(x) for x in fields]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / ticks


def device_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "host": platform.node(), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__)}


def measure_latency(
    module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    min_run_time: float = 0.5,
    warmup: int = 2,
    device: str | torch.device | None = None,
    busy_cores: float = BUSY_CORES,
    busy_retries: int = BUSY_RETRIES,
) -> list[Latency]:
    """Median latency per batch with torch.utils.benchmark (which syncs CUDA and picks repeat counts).

    ``module`` is an ``nn.Module`` or any callable on a float (N, C, H, W) batch, such as a
    `tinysaver.runtimes.Runner`; ``device`` defaults to the module's parameters' device.
    While timing, it measures what the rest of the machine does (``LoadMeter``): a size timed
    while other processes kept more than ``busy_cores`` cores busy is timed again, up to
    ``busy_retries`` more times, and returned with ``noisy`` set if the machine stayed busy.
    """
    if device is None:
        params = getattr(module, "parameters", None)
        device = next(params()).device if params else torch.device("cpu")
    out = []
    for bs in batch_sizes:
        if bs < 1:
            raise UsageError(f"batch sizes must be ≥ 1, got {bs}")
        x = torch.randn(bs, *input_shape[-3:], device=device)
        if hasattr(module, "expect_batch"):  # a Runner: an OpenVINO one compiles for this shape now
            module.expect_batch(bs)
        meter = LoadMeter()
        for attempt in range(busy_retries + 1):
            with torch.inference_mode():
                for _ in range(warmup):
                    module(x)
                t = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
                meter.start()
                meas = t.blocked_autorange(min_run_time=min_run_time)
                other = meter.stop()
            if other is None or other <= busy_cores:
                break
            if attempt < busy_retries:
                time.sleep(1.0)  # give a short-lived neighbour the chance to finish
        noisy = None
        if other is not None and other > busy_cores:
            noisy = (f"other processes kept {other:.2f} cores busy while timing (more than {busy_cores:g}), "
                     f"after {busy_retries + 1} tries")
        ms = meas.median * 1e3
        out.append(Latency(bs, ms, bs / meas.median, len(meas.times), None if other is None else round(other, 3),
                           noisy))
    return out


def latency_table(lats: Sequence[Latency]) -> dict[str, dict[str, Any]]:
    out = {}
    for lat in lats:
        row: dict[str, Any] = {"ms_per_batch": round(lat.ms_per_batch, 4), "images_per_s": round(lat.images_per_s, 2)}
        if lat.other_load is not None:
            row["other_load"] = lat.other_load
        if lat.noisy:
            row["noisy"] = lat.noisy
        out[f"bs{lat.batch_size}"] = row
    return out


__all__ = ["FlopCount", "Latency", "LoadMeter", "count_flops", "flop_counter", "measure_latency", "device_info", "latency_table"]
