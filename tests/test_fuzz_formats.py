"""Every declared format, fuzzed: valid documents mutated by hypothesis (a field replaced by a
hostile value, removed, or joined by an unknown one) must be read to a correct value or refused with
the family's one plain line naming the file; never another exception, never a hang.

The example counts are fixed and the runs derandomized; ``--hypothesis-profile=deep`` runs longer."""
import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tinysaver.errors import SelectionError, TinysaverError, UsageError, ZooError  # noqa: E402
from tinysaver.manifest import ModelEntry  # noqa: E402
from tinysaver.policy import Selection  # noqa: E402
from tinysaver.serve.http import BadRequest  # noqa: E402
from tinysaver.serve.oip import parse_infer  # noqa: E402

settings.register_profile("deep", max_examples=5000, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

HOSTILE = st.one_of(
    st.sampled_from([None, True, 0, -1, -32, 1.5, float("nan"), float("inf"), "", "lots", "1", "../../evil",
                     "bogus", [], [0.0], {}, {"x": 1}, [[[]]], 10**30, "x" * 300]),
    st.integers(), st.floats(), st.text(max_size=8), st.lists(st.integers(), max_size=4),
)

PROFILE = {"zoo": "z", "splits": {"calib": "foolbox"}, "batch_sizes": [1, 2], "eval_batch_size": 4,
           "latency_min_run_time": 0.1,
           "models": [{"name": "resnet10t", "num_classes": 10, "in_chans": 1, "input_size": 32,
                       "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.3], "std": [0.35]}}]}
SELECTION = {"schema_version": 1, "zoo": "z", "base": "b", "criterion": "zero", "target": "labels",
             "stages": [{"model": "s", "threshold": 0.9}, {"model": "b", "threshold": None}],
             "exit_ratio_calib": [0.7, 0.3], "acc_base_calib": 0.92, "acc_cascade_calib": 0.92}
ENTRY = {"status": "measured", "num_classes": 10, "flops": 1e6, "params": 1000,
         "accuracy": {"calib": 0.9}, "preprocess": {"input_size": [1, 28, 28], "crop_pct": 1.0,
                                                    "interpolation": "bilinear", "mean": [0.3], "std": [0.35]}}
OIP = {"id": "r", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="],
                              "parameters": {"binary_data": False}}],
       "outputs": [{"name": "label", "parameters": {"classification": 1}}], "parameters": {"binary_data_output": False}}


def paths(doc, at=()):
    """Every path into ``doc``: keys of mappings and indices of lists, at every depth."""
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*at, i))


@st.composite
def mutated(draw, doc):
    """``doc`` with one to three mutations: a value replaced, a key removed, or an unknown key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p in paths(doc) if p]
        if not places:
            break
        where = draw(st.sampled_from(places))
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        kind = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if kind == "remove" and isinstance(parent, dict):
            parent.pop(where[-1], None)
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["colour", "zoo", "extra"]))] = draw(HOSTILE)
        else:
            parent[where[-1]] = draw(HOSTILE)
    return doc


def one_plain_line(e: BaseException, where: str) -> None:
    msg = str(e)
    assert msg.startswith(where) and "\n" not in msg and "object at 0x" not in msg and "Error" not in msg, msg
    assert len(msg) < 600, msg


@FUZZ
@given(mutated(PROFILE))
def test_profile_configs(doc):
    from tinysaver.profiler import ProfileConfig

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.yaml"
        f.write_text(yaml.safe_dump(doc))
        try:
            cfg = ProfileConfig.from_yaml(f)
        except UsageError as e:
            one_plain_line(e, str(f))
            return
        except TinysaverError as e:  # a model spec's own check, after the format: still one line
            assert "\n" not in str(e), str(e)
            return
    # read: then every value is what the format promises
    assert "/" not in cfg.zoo and ".." not in cfg.zoo and cfg.splits and cfg.models
    assert all(isinstance(b, int) and b >= 1 for b in cfg.batch_sizes) and cfg.eval_batch_size >= 1
    assert math.isfinite(cfg.latency_min_run_time) and cfg.latency_min_run_time > 0
    for m in cfg.models:
        std = (m.preprocess or {}).get("std") or []
        assert all(math.isfinite(s) and s > 0 for s in std)


@FUZZ
@given(mutated(SELECTION))
def test_selection_files(doc):
    try:
        sel = Selection.from_dict(doc, "sel.json")
    except SelectionError as e:
        one_plain_line(e, "sel.json")
        return
    assert sel.schema_version == 1 and sel.stages[-1].threshold is None and sel.stages[-1].model == sel.base
    assert all(0 <= s.threshold <= 1 for s in sel.savers)


@FUZZ
@given(mutated({"models": {"m": ENTRY}}))
def test_manifest_entries(doc):
    if not isinstance(doc.get("models"), dict) or not isinstance(doc["models"].get("m"), dict):
        return  # the manifest's outer shape is load_zoo's, tested in test_manifest
    try:
        e = ModelEntry.from_dict("m", doc["models"]["m"], "zoo.yaml")
    except ZooError as err:
        one_plain_line(err, "zoo.yaml")
        return
    if e.preprocess:
        assert all(s > 0 and math.isfinite(s) for s in e.preprocess["std"])
        assert e.preprocess["interpolation"] in ("bicubic", "bilinear", "nearest", "lanczos")
    assert e.num_classes is None or (isinstance(e.num_classes, int) and e.num_classes >= 2)


@FUZZ
@given(mutated(OIP))
def test_oip_infer_bodies(doc):
    try:
        req = parse_infer(json.dumps(doc).encode(), None, 256)
    except BadRequest as e:
        assert e.status in (400, 413) and "\n" not in e.reason and len(e.reason) < 600, e.reason
        return
    assert 1 <= len(req.images) <= 256 and all(isinstance(b, bytes) for b in req.images)
    assert all(isinstance(o.binary, bool) and o.classification in (0, 1) for o in req.outputs)
