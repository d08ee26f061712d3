"""tinysaver.policy: the one rule, the typed Selection and its validation."""
import json

import numpy as np
import pytest

from tinysaver.policy import (
    SCHEMA_VERSION,
    Selection,
    SelectionError,
    Stage,
    answers,
    apply,
    exit_ratios,
    near_threshold,
    per_sample_cost,
    stage_costs,
)


def test_first_confident_stage_answers():
    confs = np.array([[0.9, 0.2, 0.5, 0.1],
                      [0.1, 0.8, 0.7, 0.2],
                      [0.3, 0.3, 0.3, 0.3]])  # the last row (the base) is never read
    where = apply(confs, [0.5, 0.75])
    assert where.tolist() == [0, 1, 0, 2]
    preds = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    assert answers(preds, where).tolist() == [1, 2, 1, 3]
    assert exit_ratios(where, 3) == [0.5, 0.25, 0.25]
    assert apply(confs, [np.inf, 0.0]).tolist() == [1, 1, 1, 1]  # inf disables a stage
    assert apply(confs, []).tolist() == [0, 0, 0, 0]  # the base alone


def test_comparison_is_exact_between_neighbouring_float32_values():
    a = np.float32(0.7)
    b = np.nextafter(a, np.float32(1))  # the next float32 above
    t = (float(a) + float(b)) / 2  # would round to a or b in float32
    assert apply([np.array([a, b], dtype=np.float32)], [t]).tolist() == [1, 0]
    assert near_threshold([np.array([a, b])], [t]) == [2]  # and both are reported as in the margin


def test_cost_per_sample():
    cum = stage_costs([1.0, 2.0, 10.0])
    assert cum.tolist() == [1.0, 3.0, 13.0]
    assert per_sample_cost(np.array([0, 2, 1]), cum).tolist() == [1.0, 13.0, 3.0]


def sel(**kw):
    d = dict(zoo="z", base="b", stages=[{"model": "s", "threshold": 0.5}, {"model": "b", "threshold": None}])
    d.update(kw)
    return d


def test_selection_round_trip(tmp_path):
    s = Selection.from_dict(sel(criterion="guaranteed", delta=0.1, schema_version=SCHEMA_VERSION))
    assert s.stages == [Stage("s", 0.5), Stage("b", None)] and s.thresholds == [0.5]
    f = s.save(tmp_path / "sel.json")
    back = Selection.load(f)
    assert back == s and json.loads(f.read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("bad, match", [
    (sel(schema_version=SCHEMA_VERSION, stages=[{"model": "b", "threshold": 0.5}, {"model": "b", "threshold": None}]),
     "own saver"),
    (sel(schema_version=SCHEMA_VERSION, stages=[{"model": "s", "threshold": 1.5}, {"model": "b", "threshold": None}]),
     r"stages\[0\]\.threshold: must be <= 1, got 1\.5"),
    (sel(schema_version=SCHEMA_VERSION, stages=[{"model": "s", "threshold": 0.5}, {"model": "b", "threshold": 0.2}]),
     "must be null"),
    (sel(schema_version=SCHEMA_VERSION, stages=[{"model": "s", "threshold": 0.5}, {"model": "x", "threshold": None}]),
     "last stage must be the base"),
    (sel(schema_version=SCHEMA_VERSION, stages=[{"model": "s"}, {"model": "b", "threshold": None}]),
         r"stages\[0\].threshold: is required"),
    (sel(schema_version=SCHEMA_VERSION, criterion="magic"), "criterion"),
    (sel(), "schema_version"),
    (sel(schema_version=99), "schema_version: must be 1 or 2, got 99"),
        (sel(schema_version="1"), "schema_version: must be 1 or 2, got '1' \\(text\\)"),
        (sel(schema_version=SCHEMA_VERSION, zoo=None), "zoo: must be text, got nothing"),
    (sel(schema_version=SCHEMA_VERSION, colour="red"), "colour: is not a known field"),
    ([1, 2], "JSON object"),
])
def test_selection_rejects_bad_input(bad, match):
    with pytest.raises(SelectionError, match=match):
        Selection.from_dict(bad, source="sel.json")


def test_selection_file_errors_name_the_file(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(SelectionError, match="broken.json: not JSON \\(Expecting property name"):
        Selection.load(f)
    with pytest.raises(SelectionError, match="no such selection file"):
        Selection.load(tmp_path / "missing.json")
