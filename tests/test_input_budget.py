"""The input budget: an image is refused from its header when it, or a model's resize of it, is over
--max-pixels, so that no small file can make preprocessing allocate gigabytes.

The memory checks run in a subprocess that watches its own RSS and exits at a hard ceiling, so a
regression fails the test instead of taking the machine down."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.helpers import zero_png
from tinysaver.budget import InputBudget
from tinysaver.decoding import decode_image
from tinysaver.errors import PixelCapError
from tinysaver.limits import MAX_PIXELS
from tinysaver.models import Preprocess
from tinysaver.transforms import prepare_batch

IMAGENET_224 = Preprocess()  # 224 × 224, crop 0.875: the shorter side is resized to 256
FASHION_32 = Preprocess((1, 32, 32), 1.0, "bilinear", (0.286,), (0.353,))
HOSTILE = [(100000, 1), (1, 100000), (65535, 2), (12000, 12000), (20000, 20000)]


def test_resized_size_is_what_the_transform_makes():
    rng = np.random.default_rng(3)
    for h, w in [(5, 300), (300, 5), (17, 17), (224, 224), (257, 300)]:
        img = torch_image(rng, h, w)
        size = IMAGENET_224.resized_size(h, w)
        assert size is None if (h, w) == (224, 224) else size[0] == 256 or size[1] == 256
        assert prepare_batch([img], IMAGENET_224).shape == (1, 3, 224, 224)
    from torchvision.transforms.v2 import functional as F

    img = torch_image(rng, 5, 300)
    assert tuple(F.resize(img, [256], antialias=True).shape[-2:]) == IMAGENET_224.resized_size(5, 300)


def torch_image(rng, h, w):
    import torch

    return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))


@pytest.mark.parametrize("w,h", HOSTILE)
def test_hostile_shapes_are_refused_from_the_header(w, h):
    data = zero_png(w, h)
    with pytest.raises(PixelCapError, match=f"{w} × {h} pixels") as e:
        decode_image(data, InputBudget(MAX_PIXELS, (IMAGENET_224,)))
    assert "--max-pixels" in str(e.value) and "\n" not in str(e.value)


def test_one_knob_lifts_the_cap_and_pil_stays_quiet(recwarn):
    # 20000 × 10000 is over PIL's own bomb limit (179 MP would refuse it; 89 MP warns); tinysaver's
    # cap decides both ways, and PIL's warning never reaches the user
    data = zero_png(4000, 30000)  # 120 MP, PIL's warning zone, refused by the default cap
    with pytest.raises(PixelCapError, match="over the cap of 40,000,000"):
        decode_image(data)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    small = zero_png(300, 200)
    with pytest.raises(PixelCapError, match="over the cap of 100 pixels"):
        decode_image(small, 100)
    assert decode_image(small, 60_000).shape == (1, 200, 300)
    # a resize over the cap is refused although the image itself fits
    with pytest.raises(PixelCapError, match=r"resized to 256 × 15,360 .* over the cap of 60,000"):
        decode_image(zero_png(3, 180), InputBudget(60_000, (IMAGENET_224,)))
    # and --max-pixels lifts the cap past what PIL alone would refuse (2 × 89.5 MP)
    assert decode_image(zero_png(18000, 10000), 200_000_000).shape == (1, 10000, 18000)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_budget_validates_its_cap():
    from tinysaver.errors import DatasetError

    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(DatasetError, match="whole number of pixels"):
            InputBudget(bad)


PROBE = textwrap.dedent('''
    import io, json, os, resource, sys, threading, time
    CEILING = int(sys.argv[1])

    def watch():  # the process ends itself at the ceiling: a regression fails, never swaps or OOMs
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page > CEILING:
                    print(json.dumps({"killed_at": CEILING}), flush=True)
                    os._exit(3)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    from tinysaver.budget import InputBudget
    from tinysaver.decoding import decode_image
    from tinysaver.errors import PixelCapError
    from tinysaver.models import Preprocess
    from tinysaver.transforms import prepare_batch

    pres = (Preprocess(), Preprocess((1, 32, 32), 1.0, "bilinear", (0.286,), (0.353,)))
    budget = InputBudget(preprocess=pres)
    prepare_batch([decode_image(open(sys.argv[2], "rb").read(), budget)], pres[0])  # warm-up: allocator, kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = []
    for path in sys.argv[3:]:
        with open(path, "rb") as f:
            data = f.read()
        try:
            img = decode_image(data, budget)
            for p in pres:
                prepare_batch([img], p)
            out.append("processed")
        except PixelCapError as e:
            out.append("refused: " + str(e))
        del data
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"results": out, "grew_mb": grew / 2**20}), flush=True)
''')


def run_probe(tmp_path, files: list[bytes], ceiling_mb: int = 2048) -> dict:
    warm = tmp_path / "warm.png"
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(warm)
    paths = []
    for i, data in enumerate(files):
        p = tmp_path / f"f{i}.img"
        p.write_bytes(data)
        paths.append(str(p))
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = subprocess.run([sys.executable, str(script), str(ceiling_mb * 2**20), str(warm), *paths],
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-2000:]
    assert "killed_at" not in lines[-1], f"the probe passed its {ceiling_mb} MB ceiling: {done.stdout}"
    assert done.returncode == 0, done.stderr[-2000:]
    return lines[-1]


# 64 MB: each hostile file is refused from its header, so nothing is decoded or resized
HOSTILE_GROWTH_MB = 64
# 400 MB: the largest image the default budget lets through costs its decode (40 MP as RGB, 120 MB)
# or a resize of up to 40 MP (measured 281 MB peak for 610 × 1 → 256 × 156,160)
ACCEPTED_GROWTH_MB = 400


def test_hostile_shapes_stay_within_the_memory_bound(tmp_path):
    got = run_probe(tmp_path, [zero_png(w, h) for w, h in HOSTILE])
    assert all(r.startswith("refused: ") for r in got["results"]), got["results"]
    assert got["grew_mb"] < HOSTILE_GROWTH_MB, got


def test_random_small_shapes_are_refused_or_processed_within_the_bound(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    cases: list[tuple[int, int, str]] = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(1, 700), st.integers(1, 700), st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP"]))
    def collect(w, h, fmt):
        cases.append((w, h, fmt))

    collect()
    cases += [(610, 1, "PNG"), (1, 700, "BMP")]  # the longest resizes the budget admits or refuses
    files = []
    for w, h, fmt in cases:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 120, 200)).save(buf, fmt)
        files.append(buf.getvalue())
    got = run_probe(tmp_path, files)
    for (w, h, _), r in zip(cases, got["results"]):
        over = any(s is not None and s[0] * s[1] > MAX_PIXELS
                   for s in (p.resized_size(h, w) for p in (IMAGENET_224, FASHION_32)))
        assert r.startswith("refused: ") == over, (w, h, r)
    assert "processed" in got["results"] and any(r.startswith("refused") for r in got["results"])
    assert got["grew_mb"] < ACCEPTED_GROWTH_MB, got


def test_a_model_s_preprocessing_is_known_before_its_weights_load():
    """profile checks images against every model of its config first: the preprocessing read without
    weights is the one the loaded model has."""
    from tinysaver.models import ModelSpec, create_model, model_preprocess

    specs = [ModelSpec("test_resnet", num_classes=3, input_size=32), ModelSpec("test_vit", num_classes=3),
             ModelSpec("resnet10t", num_classes=10, in_chans=1, input_size=32,
                       preprocess={"crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.286], "std": [0.353]})]
    for spec in specs:
        assert model_preprocess(spec) == create_model(spec).preprocess, spec
