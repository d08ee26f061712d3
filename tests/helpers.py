"""Helpers the test modules share (test modules never import each other)."""
import gzip
import io
import os
import socket
import struct
import zlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tinysaver import ModelSpec, create_model
from tinysaver.decoding import fingerprint
from tinysaver.published import results_dir, shared_dir
from tinysaver.zoo import atomic_write_npz, atomic_write_yaml

REPO = Path(__file__).resolve().parent.parent

SHARED = shared_dir()  # the library's rule: ../shared beside the checkout, or $TINYSAVER_SHARED

IMAGENET_TAR = SHARED / "data" / "imagenet-sample-1000.tar"

TIMM_RESULTS = results_dir()  # the tables the library reads ($TINYSAVER_TIMM_RESULTS moves them alone)

def need(path_ok: bool, what: str):
    """Skip on a user's machine without the data; under CI missing data must fail the run."""
    if path_ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what} is missing (shared data is read from {SHARED}; TINYSAVER_SHARED moves it)")
    pytest.skip(f"{what} is not available on this machine")

def need_package(name: str):
    import importlib.util

    need(importlib.util.find_spec(name) is not None, f"the Python package {name}")

def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``tinysaver.cli.main(args)`` in this process, reported as ``subprocess.run`` would.

    Each test keeps one real ``python -m tinysaver`` run for the entry point; the rest call ``main``
    here, which spares an interpreter start-up (torch and timm imports, several seconds) per call.
    """
    from tinysaver.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)

def one_line(out, *needles):
    """``out`` (a finished command) failed with exit 2 and one plain error line holding each of ``needles``."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "object at 0x" not in out.stderr and "Error:" not in lines[0].split("error:", 1)[1]

def image_folder(root, classes: int, per_class: int, seed: int, size: tuple[int, int] | None = None) -> str:
    """``root/c<k>/<i>.png`` of random RGB pixels, ``size`` (h, w) or 24–39 px a side drawn per
    image; returns the ``imagefolder:`` dataset name of it."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size or (int(rng.integers(24, 40)), int(rng.integers(24, 40)))
            (root / f"c{c}" / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return f"imagefolder:{root}"


def tiny_profile_config(zoo: str, dataset: str, classes: int):
    """Two tiny timm models (random weights, 32 px) to profile on ``dataset``, 4 images a batch."""
    from tinysaver.models import ModelSpec
    from tinysaver.profiler import ProfileConfig

    common = dict(num_classes=classes, input_size=32)
    return ProfileConfig(zoo=zoo, splits={"val": dataset},
                         models=[ModelSpec("test_efficientnet", **common), ModelSpec("test_resnet", **common)],
                         batch_sizes=[1], eval_batch_size=4, topk=2, latency_min_run_time=0.01)


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

def write_zoo(root, n=600, seed=0, classes=5):
    """Four models: accuracy and cost grow together; confident answers are more often right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    difficulty = rng.random(n)
    splits = {}
    path = root / "syn"
    for split, sl in (("calib", slice(0, n // 2)), ("test", slice(n // 2, n))):
        ids = np.array([f"s{i}" for i in range(n)])[sl]
        splits[split] = {"source": "synthetic", "fingerprint": fingerprint(list(ids), y[sl]), "samples": len(ids)}
        atomic_write_npz(path / "splits" / f"{split}.npz", ids=ids, labels=y[sl])
    models = {}
    for i, (acc, flops) in enumerate([(0.6, 1e6), (0.7, 3e6), (0.8, 1e7), (0.85, 5e7)]):
        right = difficulty + rng.normal(0, 0.1, n) < acc
        pred = np.where(right, y, (y + 1 + rng.integers(0, classes - 1, n)) % classes).astype(np.int32)
        conf = np.clip(np.where(right, 0.75, 0.45) + rng.normal(0, 0.15, n), 0.2, 1).astype(np.float32)
        key = f"m{i}"
        for split, sl in (("calib", slice(0, n // 2)), ("test", slice(n // 2, n))):
            atomic_write_npz(path / "preds" / key / f"{split}.npz", fingerprint=np.array(splits[split]["fingerprint"]),
                             pred=pred[sl], conf=conf[sl])
        models[key] = {"key": key, "status": "measured", "num_classes": classes, "flops": int(flops),
                       "macs": int(flops / 2), "params": 1000 * (i + 1),
                       "latency": {"device": "cpu", "table": {"bs1": {"ms_per_batch": 1.0 + i, "images_per_s": 1}}},
                       "accuracy": {s: float((pred[sl] == y[sl]).mean()) for s, sl in
                                    (("calib", slice(0, n // 2)), ("test", slice(n // 2, n)))}}
    atomic_write_yaml(path / "zoo.yaml", {"name": "syn", "splits": splits, "models": models})
    return path

SEEDS = {"test_efficientnet": 11, "test_resnet": 12, "test_vit": 13}  # fixed numbers: hash() changes per process

def tiny(name, n=3, **kw):
    torch.manual_seed(SEEDS[name])
    return create_model(ModelSpec(name, num_classes=n, **kw))

def split_threshold(conf, q=0.5):
    """A threshold near quantile q of ``conf``, halfway between two neighbouring distinct values,
    and how many samples lie within the policy margin of it (float noise could flip only those)."""
    from tinysaver.policy import MARGIN

    v = np.unique(conf.astype(np.float64))
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    t = float((v[i - 1] + v[i]) / 2)
    return t, int((np.abs(conf - t) < MARGIN).sum())

def offline_reference(stages, thresholds, images):
    """Run every model on the whole input, then apply the thresholds in order."""
    from tinysaver.transforms import prepare_batch

    outs = []
    with torch.inference_mode():
        for m in stages:
            prob = m.module(prepare_batch(images, m.preprocess)).softmax(-1)
            c, p = prob.max(-1)
            outs.append((p.numpy(), c.numpy()))
    n = len(images)
    pred, conf, stage = np.empty(n, int), np.empty(n, np.float32), np.empty(n, int)
    for j in range(n):
        for i, (p, c) in enumerate(outs):
            if i == len(outs) - 1 or c[j] >= thresholds[i]:
                pred[j], conf[j], stage[j] = p[j], c[j], i
                break
    return pred, conf, stage

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def png(img: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()

def post_image(client, data: bytes, path="/predict", ctype="image/png"):
    return client.post(path, content=data, headers={"content-type": ctype})

def post_answered(client, data: bytes, path="/predict", tries: int = 3):
    """POST as a client should: a 503 says 'retry', so retry (an overloaded machine gives some)."""
    for _ in range(tries):
        r = post_image(client, data, path)
        if r.status_code != 503:
            break
    return r

def write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


class FailingStage:
    """An engine stage that always raises (a model that broke in the replica)."""

    needs_images = True

    def __init__(self, name: str):
        self.name = name

    def __call__(self, images, carry=None):
        raise RuntimeError(f"{self.name} is broken")


def stages_with_a_broken_base(plan, device="cpu", only=None) -> dict:
    """A ServiceSpec factory (``tests.helpers:stages_with_a_broken_base``): the plan's models, but the
    last stage raises on every batch."""
    from tinysaver.serve.stages import model_stages

    last = len(plan.stages.keys) - 1
    wanted = list(range(last + 1)) if only is None else list(only)
    out = model_stages(plan, device, [i for i in wanted if i != last])
    if last in wanted:
        out[last] = FailingStage(plan.stages.names[last])
    return out

def zero_png(width: int, height: int, rgb: bool = False) -> bytes:
    """A greyscale (or RGB) PNG of zeros, written row by row: a 20000² file without a 400 MB array."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row, parts = zlib.compressobj(9), b"\0" * (width * (3 if rgb else 1) + 1), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def stage_plan(names: tuple, thresholds: tuple) :
    """A plan of ``names`` (zoo models nobody loads) on the default backend."""
    from tinysaver.stageplan import StagePlan

    n = len(names)
    return StagePlan("z", names, names, thresholds, (1.0,) * n, ("eager",) * n, (None,) * n, (False,) * n)
