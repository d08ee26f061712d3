"""tinysaver: a small saver model answers the easy inputs so the large base model runs less.

Data flows one way: profiler → zoo_index → selector → cascade (and the ``esn`` package).
Names are imported on first use, so ``tinysaver query`` does not pay for torch and timm. Inside
the package, imports are at module level, except where one would make a light module (the CLI, the
zoo, the selector, the serve builder) load torch, Ray or an optional extra: those stay in the
function that needs them (tests/test_cli_errors.py checks that the light modules stay light, and
tests/test_registries.py that each import inside a function keeps a third-party package out).
"""
from importlib import import_module

__version__ = "0.1.0"

# the public API, name → module: the API reference (docs/api.md) lists exactly these
_PUBLIC = {
    "Zoo": "zoo", "list_zoos": "zoo", "load_zoo": "zoo", "ModelEntry": "manifest", "import_zoo": "importer",
    "SelectorConfig": "selector", "select": "selector", "select_all": "selector", "PolicyRequest": "selector",
    "selection_for": "selector", "model_cost": "costs", "Selection": "policy", "Stage": "policy",
    "apply": "policy", "confidence": "policy", "confident": "policy",
    "gear_plan": "gears", "GearPlan": "gears", "GearBox": "gears",
    "resolve": "stageplan", "StagePlan": "stageplan", "Cascade": "cascade", "CascadeResult": "cascade",
    "build_cascade": "cascade", "open_files": "infer", "ModelSpec": "models", "Preprocess": "models",
    "create_model": "models", "Backend": "backends", "Registry": "registry",
    "ServeOptions": "serve.options", "build_app": "serve.builders", "service_spec": "serve.builders",
    "ProfileConfig": "profiler", "profile": "profiler", "profile_on_ray": "profile_ray",
    "load_dataset": "data", "register_source": "sources", "InputBudget": "budget", "calibrate_zoo": "calibration",
    "train_saver": "defer", "DeferSettings": "defer", "add_to_zoo": "defer",
    **{e: "errors" for e in ("TinysaverError", "UsageError", "ZooError", "DatasetError", "ImageError", "PixelCapError",
                             "SelectionError", "CascadeError", "BackendError", "ModelNotFoundError", "CheckpointError",
                             "ServeError", "DeviceError", "MissingExtraError", "NotFoundError", "MissingFileError")},
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'tinysaver' has no attribute {name!r}")
