"""tinysaver: a small saver model answers the easy inputs so the large base model runs less.

Data flows one way: profiler → zoo_index → selector → cascade (and the ``esn`` package).
Names are imported on first use, so ``tinysaver query`` does not pay for torch and timm. Inside
the package, imports are at module level, except where one would make a light module (the CLI, the
zoo, the selector, the serve builder) load torch, Ray or an optional extra: those stay in the
function that needs them (tests/test_cli_errors.py checks that the light modules stay light).
"""
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Cascade": "cascade", "CascadeResult": "cascade", "build_cascade": "cascade",
    "load_dataset": "data",
    "ModelSpec": "models", "Preprocess": "models", "create_model": "models",
    "ProfileConfig": "profiler", "profile": "profiler",
    "Selection": "policy", "Stage": "policy", "SelectorConfig": "selector", "select": "selector",
    "select_all": "selector",
    "Zoo": "zoo", "list_zoos": "zoo", "load_zoo": "zoo",
    "TinysaverError": "errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'tinysaver' has no attribute {name!r}")
