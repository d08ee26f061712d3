"""The typed zoo manifest entry: every entry is checked when a zoo loads, and a bad one is named."""
import pytest
import yaml

from tests.helpers import run_here, write_zoo
from tinysaver.errors import ZooError
from tinysaver.manifest import ModelEntry
from tinysaver.selector import SelectorConfig, select
from tinysaver.zoo import list_zoos, load_zoo


def edit(root, model, **fields):
    f = root / "syn" / "zoo.yaml"
    m = yaml.safe_load(f.read_text())
    for k, v in fields.items():
        if v is ...:
            m["models"][model].pop(k)
        else:
            m["models"][model][k] = v
    f.write_text(yaml.safe_dump(m))
    return f


@pytest.fixture
def root(tmp_path):
    write_zoo(tmp_path)
    return tmp_path


def test_every_bundled_zoo_loads_and_types_its_entries():
    for name in list_zoos():
        zoo = load_zoo(name)
        for key in zoo.models:
            e = zoo.entry(key)
            assert isinstance(e, ModelEntry) and e.key == key and e.status in ("measured", "published")
            assert e.flops is None or e.flops > 0


@pytest.mark.parametrize("field, value, says", [
    ("flops", -5, "models.m1.flops: must be > 0, got -5"),
    ("flops", "lots", "models.m1.flops: must be a number, got 'lots' (text)"),
    ("flops", "1.7e6", "YAML reads 1.5e6 as text"),
    ("flops", float("nan"), "models.m1.flops: must be a finite number"),
    ("flops", True, "models.m1.flops: must be a number, got True"),
    ("params", 12.5, "models.m1.params: must be an integer, got 12.5"),
    ("num_classes", "ten", "models.m1.num_classes: must be an integer"),
    ("num_classes", 1, "models.m1.num_classes: must be >= 2, got 1"),
    ("accuracy", {"calib": 1.5}, "models.m1.accuracy.calib: must be <= 1, got 1.5"),
    ("status", "measurd", "models.m1.status: must be 'measured', 'imported' or 'published'"),
    ("flop", 5, "models.m1.flop: is not a known field"),
    ("key", "m2", "models.m1.key: must be the entry's own name 'm1', got 'm2'"),
    ("latency", {"table": {"bs1": {"ms_per_batch": 0}}}, "models.m1.latency.table.bs1.ms_per_batch: must be > 0"),
    ("latency", {"table": {"batch1": {"ms_per_batch": 1}}}, "models.m1.latency.table.batch1: must be a batch size key"),
    ("backends", {"tensorrt": {}}, "models.m1.backends.tensorrt: must be a backend (eager,"),
    ("calibration", {"temperature": -1.0}, "models.m1.calibration.temperature: must be > 0"),
    ("source", "timm", "models.m1.source: must be a mapping, got 'timm' (text)"),
])
def test_a_bad_field_is_refused_on_load_naming_file_model_and_field(root, field, value, says):
    f = edit(root, "m1", **{field: value})
    with pytest.raises(ZooError) as e:
        load_zoo("syn", root)
    msg = str(e.value)
    assert msg.startswith(f"{f}: models.m1") and says in msg and "\n" not in msg, msg


GOOD_PRE = {"input_size": [1, 28, 28], "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.3], "std": [0.35]}


@pytest.mark.parametrize("change, says", [
    ({"input_size": [3, 224]}, "models.m1.preprocess.input_size: needs at least 3 items, got [3, 224]"),
    ({"std": [0.0]}, "models.m1.preprocess.std[0]: must be > 0, got 0.0"),
    ({"std": [float("nan")]}, "models.m1.preprocess.std[0]: must be a finite number (not NaN or infinity), got nan"),
    ({"interpolation": "bogus"}, "models.m1.preprocess.interpolation: must be 'bicubic', 'bilinear', 'nearest' or "
                                 "'lanczos', got 'bogus' (text)"),
    ({"mean": [0.1, 0.2, 0.3]}, "models.m1.preprocess: mean and std need one value per input channel (1)"),
    ({"crop": 1.0}, "models.m1.preprocess.crop: is not a known field"),
])
def test_a_bad_preprocessing_is_refused_on_load_with_its_field_path(root, change, says):
    """The preprocessing is read through its declared schema: a zero std (the saver then never answers)
    or an unknown filter (confidences change) is refused when the zoo loads, not run."""
    f = edit(root, "m1", preprocess={**GOOD_PRE, **change})
    with pytest.raises(ZooError) as e:
        load_zoo("syn", root)
    assert str(e.value) == f"{f}: {says}", str(e.value)
    edit(root, "m1", preprocess=GOOD_PRE)
    assert load_zoo("syn", root).preprocess("m1").std == (0.35,)


def test_negative_flops_no_longer_reports_a_false_saving(root, capsys):
    """The issue's case: flops −5 on a saver reported 'saving 70.1 %'; now one line names it, exit 2."""
    good = select(load_zoo("syn", root), "m3", SelectorConfig()).best
    assert good.found and good.saving_pct > 0
    edit(root, good.savers[0].model, flops=-5)
    r = run_here(capsys, "query", "--root", str(root), "--zoo", "syn", "--base", "m3")
    assert r.returncode == 2 and "saving" not in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "models.m1.flops: must be > 0, got -5" in err[0].replace(good.savers[0].model, "m1") and "zoo.yaml" in err[0]


def test_optional_fields_may_be_absent_and_the_typed_entry_is_what_the_selector_reads(root):
    edit(root, "m0", latency=..., macs=...)
    zoo = load_zoo("syn", root)
    e = zoo.entry("m0")
    assert e.latency is None and e.macs is None and e.flops == zoo.models["m0"]["flops"]
    # the selector's FLOPs cost is the typed entry's
    from tinysaver.costs import model_cost

    assert model_cost(zoo, "m0", "flops") == float(e.flops)


def test_zoo_list_shows_a_broken_zoo_as_an_error_row(root):
    from tinysaver.zoo import zoo_summaries

    edit(root, "m2", flops="lots")
    row = {r["zoo"]: r for r in zoo_summaries(root)}["syn"]  # the bundled zoos are listed too
    assert row["where"] == "--root" and row["splits"].startswith("error: ") and "models.m2.flops" in row["splits"]


@pytest.mark.parametrize("change, says", [
    (lambda m: m["splits"]["calib"].pop("fingerprint"), "splits.calib.fingerprint: is required"),
    (lambda m: m["splits"]["calib"].update(class_names=5), "splits.calib.class_names: must be"),
    (lambda m: m.update(splits=[1]), "splits: must be a mapping"),
    (lambda m: m["splits"].update({"../x": {"fingerprint": "f"}}), "splits.../x: must be a plain name"),
    (lambda m: m.update(models={"m1": 5}), "models.m1: must be a mapping, got 5"),
])
def test_the_manifest_around_its_entries_is_declared_too(root, change, says):
    f = root / "syn" / "zoo.yaml"
    m = yaml.safe_load(f.read_text())
    change(m)
    f.write_text(yaml.safe_dump(m))
    with pytest.raises(ZooError) as e:
        load_zoo("syn", root)
    assert str(e.value).startswith(f"{f}: ") and says in str(e.value) and "\n" not in str(e.value), str(e.value)
