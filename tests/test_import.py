"""``tinysaver zoo import``: zoos built from predictions made elsewhere select what profiling selects,
and every malformed record is refused in one line naming the file, the model and the first bad row."""
import csv
import os

import numpy as np
import pytest
import torch

from tests.helpers import run_here
from tinysaver.errors import TinysaverError, UsageError, ZooError
from tinysaver.importer import import_zoo
from tinysaver.policy import confidence
from tinysaver.selector import SelectorConfig, select
from tinysaver.zoo import load_zoo

CLASSES = 5


def export_official(zoo, folder, splits=("calib", "test")) -> list:
    """What the official TinySaver code writes: {model}_{split}.npz with label, preds, confs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for m in zoo.measured():
        for s in splits:
            p = zoo.predictions(m, s)
            f = folder / f"{m}_{s}.npz"
            np.savez(f, label=p.labels, preds=p.pred, confs=p.conf)
            files.append(f)
    return files


def selection_facts(result) -> tuple:
    b = result.best
    return (b.models, [round(t, 9) for t in b.thresholds], b.exit_ratio_calib, b.acc_cascade_calib,
            b.exit_ratio_test, b.acc_cascade_test, b.cost_base, b.cost_cascade)


@pytest.mark.parametrize("cfg", [SelectorConfig(), SelectorConfig(criterion="guaranteed", tolerance=1.0),
                                 SelectorConfig(label_free=True, max_stages=3)], ids=["zero", "guaranteed", "chain"])
def test_official_records_round_trip_to_the_profiled_selection(tmp_path, cfg):
    profiled = load_zoo("fashion-mnist")
    files = export_official(profiled, tmp_path / "records")
    import_zoo("again", files, costs_from="fashion-mnist", root=tmp_path / "root")
    imported = load_zoo("again", tmp_path / "root")
    assert imported.entry("resnet10t").status == "imported" and imported.entry("resnet10t").flops == \
        profiled.entry("resnet10t").flops
    assert imported.entry("resnet10t").imported["format"] == "official"
    assert selection_facts(select(imported, "resnet10t", cfg)) == selection_facts(select(profiled, "resnet10t", cfg))


def synthetic_logits(n: int, models: dict[str, float], seed: int = 0):
    """(labels, {model: logits}): models of rising skill (the value: how far the true class is lifted)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    out = {}
    for m, skill in models.items():
        lg = rng.normal(0, 1, (n, CLASSES)).astype(np.float32)
        lg[np.arange(n), labels] += skill
        out[m] = lg
    return labels, out


def write_logits(folder, n=400, seed=0, scale=3.0):
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s, off in (("calib", 0), ("test", 1)):
        labels, logits = synthetic_logits(n, {"tiny": 1.5, "mid": 2.5, "big": 4.0}, seed + off)
        for m, lg in logits.items():
            if m == "tiny":  # a bare (N, classes) array: its labels come from the other records
                f = folder / f"{m}_{s}.npy"
                np.save(f, lg * scale)
            else:
                f = folder / f"{m}_{s}.npz"
                np.savez(f, logits=lg * scale, label=labels)
            files.append(f)
    costs = folder.parent / "costs.csv"
    costs.write_text("model,gmacs,params_m\ntiny,0.1,1\nmid,0.5,3\nbig,2,10\n")
    return files, costs


def test_logits_give_top1_and_confidence_and_temperatures_fit_without_images(tmp_path):
    from tinysaver.calibration import calibrate_zoo

    files, costs = write_logits(tmp_path / "rec")
    import_zoo("lg", files, costs=costs, root=tmp_path / "root")
    z = load_zoo("lg", tmp_path / "root")
    raw = np.load(tmp_path / "rec" / "mid_test.npz")["logits"]
    conf, pred = confidence(torch.from_numpy(raw))
    p = z.predictions("mid", "test")
    assert np.array_equal(p.pred, pred.numpy()) and np.allclose(p.conf, conf.numpy())
    assert z.entry("mid").macs == 5e8 and z.entry("mid").flops == 1e9 and z.entry("mid").num_classes == CLASSES
    plain, _ = write_logits(tmp_path / "plain", scale=1.0)
    import_zoo("plain", plain, costs=costs, root=tmp_path / "root")
    for name in ("lg", "plain"):  # the split's source is no dataset: the stored logits are all it has
        calibrate_zoo(name, root=tmp_path / "root", log=lambda *_: None)
    z = load_zoo("lg", tmp_path / "root")
    # the same logits times 3 need a temperature 3 times as high
    assert z.temperature("mid") == pytest.approx(3 * load_zoo("plain", tmp_path / "root").temperature("mid"), rel=1e-3)
    sel = select(z, "big", SelectorConfig(calibrate="temperature")).best
    assert sel.models[-1] == "big" and sel.temperatures[0] == pytest.approx(z.temperature(sel.models[0]))


def test_csv_rows_are_aligned_by_id_across_models(tmp_path):
    files, costs = write_logits(tmp_path / "rec")
    import_zoo("ref", files, costs=costs, root=tmp_path / "root")
    ref = load_zoo("ref", tmp_path / "root")
    rng = np.random.default_rng(1)
    csvs = []
    for m in ("tiny", "mid", "big"):
        for s in ("calib", "test"):
            p = ref.predictions(m, s)
            order = rng.permutation(len(p.pred)) if m != "tiny" else np.arange(len(p.pred))
            f = tmp_path / "csv" / f"{m}_{s}.csv"
            f.parent.mkdir(exist_ok=True)
            with open(f, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id", "pred", "conf"] + (["label"] if m == "big" else []))  # labels from one model only
                for i in order:
                    w.writerow([f"img{i:04d}.png", p.pred[i], f"{p.conf[i]:.9g}"] + ([p.labels[i]] if m == "big" else []))
            csvs.append(f)
    import_zoo("fromcsv", csvs, costs=costs, root=tmp_path / "root")
    z = load_zoo("fromcsv", tmp_path / "root")
    for m in ("tiny", "mid", "big"):
        assert np.array_equal(z.predictions(m, "test").pred, ref.predictions(m, "test").pred)
    assert selection_facts(select(z, "big")) == selection_facts(select(ref, "big"))


def refused(tmp_path, files, *needles, costs=None, **kw):
    root = tmp_path / "root"
    with pytest.raises(TinysaverError) as e:
        import_zoo("bad", files, costs=costs or (tmp_path / "costs.csv"), root=root, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    # nothing half-written: no zoo, no temporary folder
    assert not (root / "bad").exists() and not [p for p in root.glob(".bad.*")] if root.exists() else True
    return msg


def official(folder, model, split, labels, preds, confs):
    f = folder / f"{model}_{split}.npz"
    np.savez(f, label=labels, preds=preds, confs=confs)
    return f


def test_malformed_records_are_refused_naming_file_model_and_row(tmp_path):
    files, costs = write_logits(tmp_path / "rec")
    d = tmp_path / "rec"
    y = np.array([0, 1, 2, 3, 4, 0])
    p = np.array([0, 1, 2, 3, 3, 0])
    good = [official(d, "a", "calib", y, p, np.full(6, 0.9)), official(d, "b", "calib", y, y, np.full(6, 0.9))]
    costs.write_text("model,gmacs\na,0.1\nb,1\n")
    refused(tmp_path, [good[0], official(d, "b", "calib", y, y, np.array([0.9, 0.9, 1.2, 0.9, 0.9, 0.9]))],
            "b_calib.npz", "model b", "row 2", "[0, 1]")
    refused(tmp_path, [good[0], official(d, "b", "calib", y[:5], y[:5], np.full(5, 0.9))], "5 samples", "has 6")
    refused(tmp_path, [good[0], official(d, "b", "calib", np.array([0, 1, 2, 3, 4, 1]), y, np.full(6, 0.9))],
            "model b", "row 5", "disagrees")
    refused(tmp_path, [good[0], official(d, "b", "calib", y, np.array([0, 1, 2, 3, 9, 0]), np.full(6, 0.9))],
            "model b", "row 4", "out of range for 5 classes", num_classes=5)
    refused(tmp_path, [good[0], official(d, "b", "calib", y, np.array([0, -1, 2, 3, 4, 0]), np.full(6, 0.9))],
            "row 1", "≥ 0")
    nolabel = [d / "a_calib.npz", d / "b_calib.npz"]
    for f, pr in zip(nolabel, (p, y)):
        np.savez(f, preds=pr, confs=np.full(6, 0.9))
    refused(tmp_path, nolabel, "split 'calib'", "no record gives labels")
    # csv: an id one model lacks is named with its row
    for m, ids in (("a", ["x0", "x1", "x2"]), ("b", ["x0", "x9", "x2"])):
        (d / f"{m}_test.csv").write_text("id,pred,conf,label\n" + "".join(f"{i},0,0.5,0\n" for i in ids))
    refused(tmp_path, [d / "a_test.csv", d / "b_test.csv"], "b_test.csv", "model b", "row 1", "'x9'", "'x1'")
    (d / "b_test.csv").write_text("id,pred,conf\nx0,0,0.5\nx1,0,0.5\nx1,0,0.5\n")
    refused(tmp_path, [d / "a_test.csv", d / "b_test.csv"], "row 2", "'x1' appears twice")
    refused(tmp_path, [good[0], official(d, "b", "calib", y, y, np.full(6, 0.9)), d / "a_test.csv"],
            "split 'test'", "no record of b")
    costs.write_text("model,gmacs\na,0.1\n")
    refused(tmp_path, good, "no cost for b", "--costs-from")
    with pytest.raises(UsageError, match=r"named \{model\}_\{split\}"):
        import_zoo("bad", [costs], costs=costs, root=tmp_path / "root")


def test_an_existing_zoo_is_replaced_only_with_force_and_whole(tmp_path):
    files, costs = write_logits(tmp_path / "rec")
    root = tmp_path / "root"
    import_zoo("z", files, costs=costs, root=root)
    before = (root / "z" / "zoo.yaml").read_bytes()
    with pytest.raises(UsageError, match="already exists.*--force"):
        import_zoo("z", files, costs=costs, root=root)
    bad = tmp_path / "rec" / "tiny_calib.npy"
    np.save(bad, np.full((400, CLASSES), np.nan, np.float32))
    with pytest.raises(ZooError, match="not finite"):
        import_zoo("z", files, costs=costs, root=root, force=True)
    assert (root / "z" / "zoo.yaml").read_bytes() == before  # the failed replacement left the old zoo as it was
    files2, _ = write_logits(tmp_path / "rec", seed=5)
    import_zoo("z", files2, costs=costs, root=root, force=True)
    assert (root / "z" / "zoo.yaml").read_bytes() != before
    assert sorted(os.listdir(root)) == ["z"]  # no temporary or old folder left beside it


def test_the_command_imports_and_infer_explains_missing_weights_in_one_line(tmp_path, capsys):
    files, costs = write_logits(tmp_path / "rec")
    root = str(tmp_path / "root")
    out = run_here(capsys, "--root", root, "zoo", "import", "cli", str(tmp_path / "rec"), "--costs", str(costs))
    assert out.returncode == 0, out.stderr
    assert "3 models" in out.stdout and "--base big" in out.stdout
    out = run_here(capsys, "--root", root, "query", "--zoo", "cli", "--base", "big")
    assert out.returncode == 0 and "imported as predictions only" in out.stdout
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    out = run_here(capsys, "--root", root, "infer", "--zoo", "cli", "--base", "big", str(img))
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert out.returncode == 2 and len(errors) == 1 and "imported as predictions only" in errors[0], out.stderr
    out = run_here(capsys, "--root", root, "zoo", "import", "cli2", str(tmp_path / "rec"))
    assert out.returncode == 2 and "--costs" in out.stderr  # a cost source is required
