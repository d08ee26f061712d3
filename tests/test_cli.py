"""The command line as a new user meets it: shared defaults, clear one-line errors, no silent flags."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, one_line, png_bytes, run_here, write_zoo
from tinysaver.cli import main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinysaver", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, **kw)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(4)
    for i in range(5):
        (d / f"img{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    return d


def test_version_module_entry_and_defaults_in_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == "tinysaver 0.1.0"
    out = run("query", "--help")
    assert "(default: zero)" in out.stdout and "(default: 2)" in out.stdout and "(default: flops)" in out.stdout


def test_root_works_after_the_subcommand(tmp_path, capsys):
    write_zoo(tmp_path)
    assert main(["query", "--zoo", "syn", "--base", "m3", "--root", str(tmp_path)]) == 0
    assert "saver:" in capsys.readouterr().out


def test_infer_and_query_share_defaults_and_selection_files(images, tmp_path, capsys):
    sel_file = tmp_path / "sel.json"
    q = run_here(capsys, "query", "--base", "resnet10t", "--save", str(sel_file))
    assert q.returncode == 0, q.stderr
    saved = json.loads(sel_file.read_text())
    runs = {"default": run("infer", "--base", "resnet10t", str(images)),  # the real entry point, once
            "from-selection": run_here(capsys, "infer", "--base", "resnet10t", "--from-selection", str(images)),
            "file": run_here(capsys, "infer", "--selection", str(sel_file), str(images))}  # it names its base
    for how, out in runs.items():
        assert out.returncode == 0, (how, out.stderr)
        summary = json.loads(out.stderr.split("summary: ")[-1])
        assert summary["images"] == 5 and summary["thresholds"] == [s["threshold"] for s in saved["stages"][:-1]], how
        assert "saver: " in out.stderr  # the thresholds in use are printed
        assert len(out.stdout.strip().splitlines()) == 6  # header + one row per image
    assert f"tinysaver infer --zoo fashion-mnist --selection {sel_file} IMAGES..." in q.stdout  # how to run it
    one_by_one = ["infer", "--base", "resnet10t", "--selection", str(sel_file), "--batch-size", "1", str(images)]
    plain, piped = run_here(capsys, *one_by_one), run_here(capsys, *one_by_one, "--pipeline")
    assert piped.returncode == 0 and piped.stdout == plain.stdout  # same rows, same order
    assert '"pipeline": true' in piped.stderr and '"pipeline": false' in plain.stderr


def test_bad_selection_files_fail_before_any_model_loads(images, tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{oops")
    one_line(run_here(capsys, "infer", "--base", "resnet10t", "--selection", str(bad), str(images)), "broken.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"zoo": "fashion-mnist", "base": "resnet10t", "schema_version": 1,
                                 "stages": [{"model": "nope", "threshold": 0.5}, {"model": "resnet10t", "threshold": None}]}))
    one_line(run_here(capsys, "infer", "--base", "resnet10t", "--selection", str(other), str(images)),
                   "'nope' is not in zoo")


@pytest.mark.parametrize("args, needle", [
    (["infer", "--base", "resnet10t", "--threshold", "0.5"], "--threshold needs exactly one --saver"),
    (["infer", "--base", "resnet10t", "--saver", "resnet10t", "--threshold", "0.5"], "own saver"),
    (["infer", "--base", "resnet10t", "--saver", "regnetx_002", "--from-selection"], "--from-selection"),
    (["infer", "--base", "resnet10t", "--batch-size", "0"], "must be ≥ 1"),
    (["plot", "--base", "resnet10t", "--saver", "resnet10t", "--out", "/tmp/x.png"], "own saver"),
    (["query", "--base", "resnet10t", "--saver", "resnet10t"], "own saver"),
    (["query", "--base", "resnet10t", "--max-stages", "4"], "invalid choice"),
    (["esn", "train", "--base", "resnet10t", "--saver", "resnet10t", "--out", "/tmp/e.pt"], "own saver"),
    (["esn", "train", "--base", "resnet10t", "--saver", "regnetx_002", "--criterion", "zero", "--out", "/tmp/e.pt"],
     "unrecognized arguments: --criterion"),
])
def test_flags_that_cannot_work_are_refused(images, args, needle, capsys):
    one_line(run_here(capsys, *args, *([str(images)] if args[0] == "infer" else [])), needle)


def test_selection_with_saver_is_refused(images, tmp_path, capsys):
    f = tmp_path / "s.json"
    f.write_text("{}")
    one_line(run_here(capsys, "infer", "--base", "resnet10t", "--selection", str(f), "--saver", "regnetx_002", str(images)),
                   "not both")


def test_zoo_list_survives_broken_manifests(tmp_path, capsys):
    write_zoo(tmp_path)
    (tmp_path / "bad-yaml").mkdir()
    (tmp_path / "bad-yaml" / "zoo.yaml").write_text("models: [unclosed\n")
    (tmp_path / "a-list").mkdir()
    (tmp_path / "a-list" / "zoo.yaml").write_text("- 1\n- 2\n")
    out = run("zoo", "list", "--root", str(tmp_path))
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "syn" in out.stdout and "not valid YAML" in out.stdout and "got a list" in out.stdout
    one_line(run_here(capsys, "zoo", "show", "a-list", "--root", str(tmp_path)), "a-list/zoo.yaml")


def test_truncated_predictions_are_named(tmp_path, capsys):
    path = write_zoo(tmp_path)
    f = path / "preds" / "m1" / "calib.npz"
    f.write_bytes(f.read_bytes()[:40])
    one_line(run_here(capsys, "query", "--zoo", "syn", "--base", "m3", "--root", str(tmp_path)), "m1/calib.npz",
                   "re-run 'tinysaver profile'")


def test_a_reader_that_leaves_early_is_no_error():
    p = subprocess.Popen([sys.executable, "-m", "tinysaver", "zoo", "show", "fashion-mnist", "--format", "csv"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()  # like `| head` exiting before the output is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipe" not in err and "Traceback" not in err


def test_zoo_show_fits_100_columns_unless_asked_for_all(capsys):
    from tests.helpers import run_here

    for zoo in ("fashion-mnist", "imagenet-lite", "imagenet-catalog"):
        out = run_here(capsys, "zoo", "show", zoo)
        assert out.returncode == 0 and max(map(len, out.stdout.splitlines())) <= 100, zoo
        assert "more columns: --wide" in out.stdout and "top1_" in out.stdout
    wide = run_here(capsys, "zoo", "show", "fashion-mnist", "--wide").stdout
    assert max(map(len, wide.splitlines())) > 100 and "ece_T_test" in wide and "more columns" not in wide


def test_option_defaults_and_choices_come_from_the_library():
    from tinysaver.cli.main import build_parser
    from tinysaver.criteria import DEFAULT_CRITERION
    from tinysaver.risk import METHODS
    from tinysaver.selector import SelectorConfig
    from tinysaver.serve.lifecycle import DRAIN_TIMEOUT_S, STARTUP_TIMEOUT_S

    parser = build_parser()
    serve = parser.parse_args(["serve", "--zoo", "fashion-mnist", "--base", "resnet10t"])
    assert (serve.startup_timeout, serve.drain_timeout) == (STARTUP_TIMEOUT_S, DRAIN_TIMEOUT_S)
    query = parser.parse_args(["query", "--zoo", "fashion-mnist", "--base", "resnet10t"])
    assert query.criterion == SelectorConfig().criterion == DEFAULT_CRITERION
    sub = next(a for a in parser._subparsers._group_actions[0].choices["query"]._actions
               if "--guarantee-method" in a.option_strings)
    assert tuple(sub.choices) == tuple(METHODS)
