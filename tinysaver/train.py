"""Train a small zoo of timm classifiers on Fashion-MNIST, reproducibly, on CPU or GPU.

Run from the repository root::

    python -m tinysaver.train --config zoo_index/configs/fashion-mnist-train.yaml

Each model trains on a fixed, seeded budget of training samples (``train_samples``) with AdamW,
a cosine schedule with linear warm-up, and light augmentation (random horizontal flip, plus an
optional ``shift``-pixel random crop; torchvision v2 functional ops). A model entry may override
``input_size``, ``lr`` and ``train_samples``. Weights are saved as safetensors, in fp16 when that leaves the
``calib`` accuracy unchanged, and a manifest records architecture, config, sha256 and the accuracy
reached by the *saved* weights.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .errors import UsageError
from .models import ModelSpec, create_model
from .sources import fashion_mnist_set
from .transforms import prepare_batch
from .yamlfile import read_mapping
from .zoo import atomic_write_bytes, atomic_write_yaml

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@dataclass
class TrainConfig:
    models: list[dict[str, Any]]
    out_dir: str = "zoo_index/checkpoints/fashion-mnist"
    input_size: int = 32
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    train_samples: int = 50_000  # default per-model budget; a model entry may override it
    shift: int = 0  # max random translation in pixels; 0 = flip only (a shift slowed learning at <=4 epochs)
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    eval_batch_size: int = 500
    fp16_tolerance: float = 0.1  # accuracy points on calib; within it, weights are stored in fp16

    MODEL_KEYS = ("arch", "label", "kwargs", "input_size", "lr", "train_samples")

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("the training config lists no models")
        labels = []
        for e in self.models:
            if not isinstance(e, dict) or "arch" not in e:
                raise UsageError(f"each model entry needs an 'arch' (a timm name), got {e!r}")
            unknown = set(e) - set(self.MODEL_KEYS)
            if unknown:
                raise UsageError(f"model {e['arch']!r}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(self.MODEL_KEYS)}")
            if int(e.get("input_size", self.input_size)) < 28:
                raise UsageError(f"model {e['arch']!r}: input_size must be ≥ 28 (Fashion-MNIST images are 28 px)")
            if int(e.get("train_samples", self.train_samples)) < 1 or float(e.get("lr", self.lr)) <= 0:
                raise UsageError(f"model {e['arch']!r}: train_samples and lr must be positive")
            labels.append(model_label(e))
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise UsageError(f"labels must be unique (they name the checkpoint files): {dup}; set 'label' on repeats")
        if self.shift < 0:
            raise UsageError(f"shift is a number of pixels ≥ 0, got {self.shift}")


def warmup_cosine(opt: torch.optim.Optimizer, warm: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear from 1/warm up to 1 over ``warm`` steps, then cosine to 0
    at step ``total``. Call ``step()`` once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warm, 1) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1))))


def model_label(entry: dict[str, Any]) -> str:
    """A model's name in the zoo and in its checkpoint file: ``label``, else the architecture."""
    return entry.get("label", entry["arch"])


def spec_for(entry: dict[str, Any], cfg: TrainConfig, checkpoint: str | None = None) -> ModelSpec:
    """The ModelSpec that rebuilds a zoo model: 1 channel, 10 classes, Fashion-MNIST statistics."""
    return ModelSpec(
        name=entry["arch"], label=model_label(entry), num_classes=10, in_chans=1,
        input_size=int(entry.get("input_size", cfg.input_size)), kwargs=entry.get("kwargs") or None, checkpoint=checkpoint,
        preprocess={"crop_pct": 1.0, "interpolation": "bilinear", "mean": [FASHION_MEAN], "std": [FASHION_STD]},
    )


def _augment(batch: torch.Tensor, gen: torch.Generator, shift: int = 0) -> torch.Tensor:
    """Random horizontal flip, then a random translation of up to ``shift`` pixels (zero fill).

    ``batch``: (N, C, H, W) raw images; the same shape comes back. Draws only from ``gen``.
    """
    n = len(batch)
    flip = torch.rand(n, generator=gen) < 0.5
    batch = torch.where(flip[:, None, None, None], v2.functional.horizontal_flip(batch), batch)
    if shift <= 0:
        return batch
    padded = v2.functional.pad(batch, [shift] * 4)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    h, w = batch.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def evaluate(model, data, batch_size: int, device) -> float:
    correct = 0
    model.module.eval()
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            x = prepare_batch(data.images[s:s + batch_size], model.preprocess).to(device)
            correct += int((model.module(x).argmax(-1).cpu().numpy() == data.labels[s:s + batch_size]).sum())
    return correct / len(data)


def train_one(entry: dict[str, Any], cfg: TrainConfig, train, calib, test, device) -> dict[str, Any]:
    label = model_label(entry)
    seed = cfg.seed + int(hashlib.sha256(label.encode()).hexdigest()[:6], 16)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model(spec_for(entry, cfg), device=device)
    net = model.module
    budget = int(entry.get("train_samples", cfg.train_samples))
    steps = math.ceil(budget / cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=float(entry.get("lr", cfg.lr)), weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, min(cfg.warmup_steps, steps // 5), steps)
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(math.ceil(budget / len(train)))])[:budget]
    labels = torch.as_tensor(train.labels)
    net.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {label}", leave=False)
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = prepare_batch(_augment(train.images[idx], gen, cfg.shift), model.preprocess).to(device)
        loss = torch.nn.functional.cross_entropy(net(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    net.eval()
    sd32 = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    res = choose_precision(model, sd32, calib, test, cfg, device)
    return {**res, "train_seconds": round(train_s, 1), "train_samples": budget, "seed": seed}


def choose_precision(model, sd32: dict, calib, test, cfg: TrainConfig, device) -> dict[str, Any]:
    """fp16 weights when calib accuracy moves by at most ``cfg.fp16_tolerance`` points, else fp32.

    Accuracies are those of the weights actually saved, so reloading reproduces them exactly.
    """
    net = model.module
    net.load_state_dict(sd32)
    acc32 = evaluate(model, calib, cfg.eval_batch_size, device)
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in sd32.items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd16.items()})
    acc16 = evaluate(model, calib, cfg.eval_batch_size, device)
    use16 = abs(acc16 - acc32) * 100 <= cfg.fp16_tolerance
    if not use16:
        net.load_state_dict(sd32)
    test_acc = evaluate(model, test, cfg.eval_batch_size, device)
    return {"state_dict": sd16 if use16 else sd32, "dtype": "float16" if use16 else "float32",
            "calib_acc": acc16 if use16 else acc32, "calib_acc_fp32": acc32, "test_acc": test_acc}


def recompress(cfg: TrainConfig) -> None:
    """Re-apply `choose_precision` to fp32 checkpoints already trained (no retraining)."""
    out = Path(cfg.out_dir)
    manifest_path = out / "manifest.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    calib = fashion_mnist_set("calib", cfg.data_root)
    test = fashion_mnist_set("test", cfg.data_root)
    entries = {model_label(e): e for e in cfg.models}
    for label, rec in manifest["models"].items():
        if rec["dtype"] != "float32":
            continue
        f = out / rec["file"]
        sd32 = load_file(str(f))
        model = create_model(spec_for(entries[label], cfg), device="cpu")
        res = choose_precision(model, sd32, calib, test, cfg, "cpu")
        if res["dtype"] == "float32":
            continue
        blob = save({k: v.contiguous() for k, v in res.pop("state_dict").items()})
        atomic_write_bytes(f, blob)
        rec.update(res, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
        atomic_write_yaml(manifest_path, manifest)
        print(f"{label}: now float16, calib {100 * rec['calib_acc']:.2f}% (fp32 {100 * rec['calib_acc_fp32']:.2f}%), "
              f"test {100 * rec['test_acc']:.2f}%, {len(blob) / 1e6:.1f} MB", flush=True)


def train_zoo(cfg: TrainConfig, only: list[str] | None = None) -> Path:
    """Train every model of ``cfg`` not yet in the manifest; returns the manifest path (resumable)."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    out = Path(cfg.out_dir)
    manifest_path = out / "manifest.yaml"
    manifest = yaml.safe_load(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    train = fashion_mnist_set("train", cfg.data_root)
    calib = fashion_mnist_set("calib", cfg.data_root)
    test = fashion_mnist_set("test", cfg.data_root)
    for entry in cfg.models:
        label = model_label(entry)
        if (only and label not in only) or label in manifest["models"]:
            continue
        res = train_one(entry, cfg, train, calib, test, device)
        blob = save({k: v.contiguous() for k, v in res.pop("state_dict").items()})
        f = out / f"{label}.safetensors"
        atomic_write_bytes(f, blob)
        spec = spec_for(entry, cfg, checkpoint=str(f))
        manifest["models"][label] = {
            "arch": entry["arch"], "spec": spec.to_dict(), "file": f.name,
            "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), **res,
        }
        atomic_write_yaml(manifest_path, manifest)
        print(f"{label}: test {100 * res['test_acc']:.2f}%, calib {100 * res['calib_acc']:.2f}%, "
              f"{res['dtype']}, {len(blob) / 1e6:.1f} MB, {res['train_seconds']:.0f}s", flush=True)
    return manifest_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--device")
    p.add_argument("--recompress", action="store_true", help="re-check fp16 for fp32 checkpoints, no training")
    args = p.parse_args(argv)
    d = read_mapping(args.config, "a training config")
    if args.device:
        d["device"] = args.device
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.recompress:
        recompress(TrainConfig(**d))
    else:
        train_zoo(TrainConfig(**d), args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["TrainConfig", "train_zoo", "recompress", "spec_for", "warmup_cosine"]
