"""The inference backends a `Runner` can run on, one module per backend in this package.

A backend is registered once, by the module that builds it (``@register_backend(name)``, as timm's
``@register_model``). Its name is its module's name, so the list of names is read from this
folder without importing any runtime: the command line's help stays free of torch. Adding a
backend is adding one file here.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BackendError
from ..registry import Registry


class ExportError(BackendError):
    """A model that a backend's export (to ONNX) cannot handle: the default backend can run it."""

DEFAULT_BACKEND = "eager"


@dataclass
class Runner:
    """One model on one backend: a float (N, C, H, W) batch → (N, classes) logits, for any N.

    ``export_s`` is the time spent exporting (0 when the cache held it); ``threads`` is the
    intra-op thread count the runtime reports it uses, and ``spin`` whether its idle threads spin
    (ONNX Runtime only)."""

    key: str
    backend: str
    fn: Callable = field(repr=False)
    export_path: Path | None = None
    export_s: float = 0.0
    cached: bool = False
    threads: int | None = None
    spin: bool = False

    def __call__(self, x):
        return self.fn(x)

    def expect_batch(self, n: int) -> None:
        """Most batches to come have ``n`` samples: a backend that runs faster on a fixed shape
        (OpenVINO) compiles for it now. Other batch sizes still run. A no-op elsewhere."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise BackendError(f"a batch size is an integer ≥ 1, got {n!r}")
        expect = getattr(self.fn, "expect_batch", None)
        if expect is not None:
            expect(int(n))


@dataclass(frozen=True)
class Backend:
    """A registered backend and what it can do. ``build(model, cache_dir, threads, spin) -> Runner``.

    ``needs``: (importable module, pip extra) when the runtime is optional. ``exports_onnx``: it runs
    an exported ONNX file, so an export failure can fall back to the default backend.
    ``torch_modules``: it runs the model's torch module in this process, on torch's one thread pool
    (so a stage cannot set its own thread count), in half precision or channels-last if asked.
    ``devices``: the torch device types it runs on. ``spins``: it takes the ``spin`` option.
    ``fixed_shapes``: it runs faster on a batch size announced with ``Runner.expect_batch``.
    ``tcmalloc_safe``: it survives a preloaded tcmalloc. ``light_calls``: its cost per call is small
    next to eager's, so a replica that runs small batches is cheaper on it, where the zoo records an
    exact export (see `tinysaver.serve.builders.layout_backend`)."""

    name: str
    build: Callable
    needs: tuple[str, str] | None = None
    exports_onnx: bool = False
    torch_modules: bool = False
    devices: tuple[str, ...] = ("cpu",)
    spins: bool = False
    fixed_shapes: bool = False
    tcmalloc_safe: bool = True
    light_calls: bool = False

    @property
    def own_threads(self) -> bool:
        """Each stage sets its runtime's intra-op thread count (not torch's shared pool)."""
        return not self.torch_modules


def backend_names() -> tuple[str, ...]:
    """Every backend's name, the default first, without importing any of them."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return (DEFAULT_BACKEND, *(n for n in found if n != DEFAULT_BACKEND))


BACKENDS = backend_names()  # what the command line offers; a registered backend is a module in this package
# a backend registers when its module is imported, which happens when it is first asked for
BACKEND_REGISTRY: Registry[Backend] = Registry("backend", BackendError, listed=backend_names,
                                               load=lambda name: importlib.import_module(f"{__name__}.{name}"))


def register_backend(name: str, **capabilities):
    """Decorator: register ``build`` as the backend ``name`` (the module's own name), with the
    `Backend` fields that say what it can do."""
    def wrap(build):
        BACKEND_REGISTRY.add(name, Backend(name, build, **capabilities))
        return build
    return wrap


def backends_that(**capabilities) -> list[str]:
    """Names of the backends whose capabilities equal ``capabilities`` (for messages and choices)."""
    return [n for n in BACKENDS if all(getattr(get_backend(n), k) == v for k, v in capabilities.items())]


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (its runtime is not imported until it builds a runner)."""
    return BACKEND_REGISTRY.get(name)


def check_backend(name: str) -> Backend:
    """Raise a one-line error when ``name`` is unknown or its runtime is not installed."""
    b = get_backend(name)
    if b.needs and importlib.util.find_spec(b.needs[0]) is None:
        raise BackendError(f"backend {name!r} needs {b.needs[0]}: pip install 'tinysaver[{b.needs[1]}]'")
    return b


__all__ = ["BACKENDS", "ExportError", "Runner", "Backend", "DEFAULT_BACKEND", "backends_that", "backend_names", "register_backend", "get_backend",
           "check_backend"]
