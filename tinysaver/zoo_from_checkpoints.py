"""Write a profile config for models trained by `tinysaver.train` (one entry per checkpoint).

    python -m tinysaver.zoo_from_checkpoints zoo_index/checkpoints/fashion-mnist/manifest.yaml \
        --zoo fashion-mnist --out zoo_index/configs/fashion-mnist.yaml
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import yaml

from .zoo import atomic_write_yaml
from .errors import UsageError


def verify_checkpoints(manifest_path: Path) -> dict:
    """Load the trainer's manifest and check every file's sha256 against it."""
    m = yaml.safe_load(manifest_path.read_text())
    for label, e in m["models"].items():
        f = manifest_path.parent / e["file"]
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest != e["sha256"]:
            raise UsageError(f"{f}: sha256 {digest[:12]}… does not match the manifest ({e['sha256'][:12]}…)")
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    mpath = Path(args.manifest)
    m = verify_checkpoints(mpath)
    models = []
    for label, e in m["models"].items():
        spec = dict(e["spec"])
        spec["checkpoint"] = str(mpath.parent / e["file"])
        models.append(spec)
    cfg = {
        "zoo": args.zoo,
        "description": "timm models trained here on Fashion-MNIST (python -m tinysaver.train); "
                       "calib = 10k held out of the official train set, test = the official 10k",
        "splits": {"train": "fashion-mnist:train", "calib": "fashion-mnist:calib", "test": "fashion-mnist:test"},
        "models": models,
        "batch_sizes": [1, 128],
        "eval_batch_size": 500,
        "topk": 3,
        "save_logits": False,
    }
    atomic_write_yaml(Path(args.out), cfg)
    print(f"profile config for {len(models)} models written to {args.out}")
    return 0


__all__ = ["verify_checkpoints", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
