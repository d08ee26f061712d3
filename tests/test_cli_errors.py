"""The command line's error contract: one error family, one plain line per bad input, a distinct exit
for bugs and for Ctrl-C, and image inputs that never hang or fail silently."""
import ast
import os
import subprocess
import sys
import tarfile
from importlib.metadata import entry_points

import numpy as np
import pytest

from tests.helpers import REPO, need_package, one_line, png_bytes, run_here
from tinysaver import errors
from tinysaver.cli import main as cli_main
from tinysaver.cli.main import BUG_REPORT, ENTRY_POINT_GROUP, EXIT_BUG, EXIT_INTERRUPTED, builtin_commands
from tinysaver.decoding import decode_image
from tinysaver.sources import paths_source


def test_every_error_class_is_one_family_and_keeps_its_builtin():
    family = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.TinysaverError) for c in family)
    for name, builtin in [("ZooError", ValueError), ("MissingExtraError", ImportError),
                          ("NotFoundError", KeyError), ("MissingFileError", FileNotFoundError)]:
        assert issubclass(getattr(errors, name), builtin)
    # the classes the modules raise are the family's, not look-alikes
    from tinysaver.cascade import CascadeError
    from tinysaver.models import CheckpointError, ModelNotFoundError
    from tinysaver.policy import SelectionError
    from tinysaver.runtimes import BackendError
    from tinysaver.zoo import ZooError
    assert {CascadeError, CheckpointError, ModelNotFoundError, SelectionError, BackendError, ZooError} <= set(family)
    assert str(errors.NotFoundError("x is not in the table")) == "x is not in the table"  # no KeyError quotes


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_tinysaver_never_imports_esn_and_no_raw_value_errors_remain():
    for f in (REPO / "tinysaver").rglob("*.py"):
        bad = [m for m in _imports(f) if m == "esn" or m.startswith("esn.")]
        assert not bad, (f, bad)
        src = f.read_text()
        # user errors come from the family; a bare builtin raise would read as a bug to the CLI
        for raw in ("raise ValueError(", "raise KeyError(", "raise ImportError("):
            assert raw not in src, (f, raw)


def test_commands_register_themselves_and_esn_plugs_in_by_entry_point():
    assert {"zoo", "profile", "query", "select", "plot", "infer", "serve", "data"} <= set(builtin_commands())
    eps = {e.name: e.value for e in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("esn") == "esn.cli:register", eps
    from tinysaver.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"esn", "exits", "data", "infer"} <= set(sub.choices)
    train = sub.choices["esn"]._actions[-1].choices["train"]
    assert any("--train-limit" in a.option_strings for a in train._actions)


def test_a_bug_prints_its_traceback_a_bug_line_and_a_distinct_code(monkeypatch, capsys):
    import tinysaver.cli.zoo as zoo_cmd

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(zoo_cmd, "cmd_zoo_list", broken)
    # the parser binds the handler when built, so build it after the patch
    rc = cli_main(["zoo", "list"])
    err = capsys.readouterr().err
    assert rc == EXIT_BUG and rc != 2
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and BUG_REPORT in err


def test_ctrl_c_in_profile_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    import tinysaver.profiler as profiler

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(profiler, "profile", interrupted)
    rc = cli_main(["--root", str(tmp_path), "profile", "--zoo", "z", "--model", "resnet10t",
                   "--split", "test=foolbox", "--quiet"])
    err = capsys.readouterr().err
    assert rc == EXIT_INTERRUPTED
    assert err.strip() == "tinysaver: interrupted; rerun the same command to resume"


@pytest.mark.parametrize("argv, words", [
    (["infer", "--base", "resnet10t", "--device", "gpu", "x.png"], "unknown device 'gpu'"),
    (["serve", "--base", "resnet10t", "--max-body-mb", "nan"], "must be a finite number > 0"),
    (["serve", "--base", "resnet10t", "--adapt"], "--adapt retunes from audits: give --audit a fraction > 0"),
    (["query", "--base", "resnet10t", "--tolerance", "nan"], "must be a finite number"),
    (["infer", "--base", "resnet10t", "--threshold", "inf", "--saver", "x", "y.png"], "must be a finite number"),
])
def test_bad_option_values_get_one_line(argv, words, capsys):
    out = run_here(capsys, *argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr and words in out.stderr, out.stderr


def test_cuda_on_a_machine_without_it_is_one_line(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    one_line(run_here(capsys, "infer", "--base", "resnet10t", "--device", "cuda", str(tmp_path)), "no usable CUDA")


def test_unusable_images_each_get_a_plain_sentence(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    good = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    (d / "good.png").write_bytes(good)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_bytes(b"hello, I am not an image")
    (d / "cut.png").write_bytes(good[: len(good) // 2])
    (d / "album.jpg").mkdir()  # a folder with an image's name
    os.mkfifo(d / "pipe.jpg")  # reading it would block forever
    out = run_here(capsys, "infer", "--base", "resnet10t", "--quiet", str(d))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "object at 0x" not in out.stderr and "Error:" not in out.stderr
    err = out.stderr
    assert f"{d / 'empty.png'}: empty file" in err
    assert f"{d / 'text.jpg'}: not an image" in err
    assert f"{d / 'cut.png'}: truncated or corrupt image data" in err
    assert f"{d / 'album.jpg'}: a folder with an image file's name" in err
    assert f"{d / 'pipe.jpg'}: not a regular file" in err
    import json

    summary = json.loads(err.split("summary: ")[-1])
    assert summary["images"] == 1 and summary["unreadable"] == 3 and summary["skipped"] == 2


def test_an_unlistable_folder_is_counted_not_silent(tmp_path, monkeypatch):
    # chmod 000 means nothing to root (CI runs as root), so the refusal is made by os.scandir itself
    d = tmp_path / "imgs"
    (d / "locked").mkdir(parents=True)
    (d / "ok.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = paths_source([d])
    assert src.ids == [str(d / "ok.png")]
    assert src.skipped == [f"{d / 'locked'}: folder not listed (permission denied)"]


def test_a_truncated_tar_is_one_line(tmp_path, capsys):
    t = tmp_path / "imgs.tar"
    with tarfile.open(t, "w") as tf:
        for i in range(3):
            p = tmp_path / f"{i}.png"
            p.write_bytes(png_bytes(np.full((28, 28), i, np.uint8)))
            tf.add(p, arcname=f"{i}.png")
    data = t.read_bytes()
    t.write_bytes(data[: 700])  # inside the first member's data: the listing fails part way
    out = run_here(capsys, "infer", "--base", "resnet10t", "--quiet", str(t))
    one_line(out, str(t), "truncated")


def test_the_pixel_cap_reads_the_header_not_the_pixels():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, format="PNG")
    with pytest.raises(errors.ImageError, match="3000 × 2000 pixels is over the cap of 5,000,000"):
        decode_image(buf.getvalue(), max_pixels=5_000_000)
    assert decode_image(buf.getvalue(), max_pixels=6_000_000).shape == (1, 2000, 3000)


def test_data_sample_writes_labelled_pngs_and_never_overwrites(tmp_path, capsys):
    from tests.helpers import need
    from tinysaver.sources import FASHION_MNIST_DIR

    need(FASHION_MNIST_DIR.exists(), "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    out = run_here(capsys, "data", "sample", "fashion-mnist", "--out", str(tmp_path / "s"), "-n", "4")
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 4
    from tinysaver.sources import FASHION_MNIST_CLASSES, fashion_mnist_arrays

    x, y, _ = fashion_mnist_arrays("test")
    for f in files:  # <index>_<label>.png holds that test image, bit for bit
        i, label = f.stem.split("_", 1)
        assert label.replace("_", " ") == FASHION_MNIST_CLASSES[y[int(i)]].replace("/", "-")
        assert np.array_equal(decode_image(f.read_bytes())[0].numpy(), x[int(i)])
    # labels.csv keeps the exact names infer prints (T-shirt/top, not the file name's T-shirt-top)
    import csv

    rows = list(csv.DictReader((tmp_path / "s" / "labels.csv").open()))
    assert [r["file"] for r in rows] == [f.name for f in files]
    assert all(r["name"] == FASHION_MNIST_CLASSES[int(r["label"])] for r in rows)
    files = sorted((tmp_path / "s").iterdir())
    before = {f: f.stat().st_mtime_ns for f in files}
    one_line(run_here(capsys, "data", "sample", "--out", str(tmp_path / "s"), "-n", "4"), "already exists")
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_the_pixel_cap_skips_and_counts_in_infer_and_profile(tmp_path, capsys, image_folder):
    from tinysaver.data import load_dataset

    d = tmp_path / "capped"
    d.mkdir()
    (d / "small.png").write_bytes(png_bytes(np.zeros((20, 20), np.uint8)))
    (d / "large.png").write_bytes(png_bytes(np.zeros((90, 80), np.uint8)))
    # 5,000: the small image's resize to the saver's 64 × 64 input (4,096 pixels) fits
    out = run_here(capsys, "infer", "--base", "resnet10t", "--quiet", "--max-pixels", "5000", str(d))
    assert out.returncode == 0 and f"{d / 'large.png'}: 80 × 90 pixels is over the cap of 5,000" in out.stderr
    import json

    assert json.loads(out.stderr.split("summary: ")[-1])["unreadable"] == 1
    # profile decodes through load_dataset with the config's cap: over-cap images are skipped and counted
    from PIL import Image

    sizes = [Image.open(f).size for f in sorted(image_folder.rglob("img*.png"))]
    over = sum(w * h > 900 for w, h in sizes)
    assert 0 < over < len(sizes)
    with pytest.warns(UserWarning, match=f"skipped {over + 1} unreadable"):  # and the fixture's broken file
        ds = load_dataset(f"imagefolder:{image_folder}", progress=False, max_pixels=900)
    assert sum("over the cap of 900 pixels" in why for _, why in ds.failures) == over
    assert all(img.shape[-1] * img.shape[-2] <= 900 for img in ds.images)


@pytest.mark.parametrize("argv, words", [
    (["query", "--base", "resnet10t", "--criterion", "zero", "--tolerance", "5"], "--criterion zero takes no tolerance"),
    (["query", "--base", "resnet10t", "--criterion", "bounded", "--tolerance", "150"], "at most 100"),
])
def test_tolerances_that_cannot_mean_anything_are_refused(argv, words, capsys):
    out = run_here(capsys, *argv)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_label_free_output_says_agreement_with_the_base(capsys):
    out = run_here(capsys, "query", "--base", "resnet10t", "--label-free")
    assert out.returncode == 0, out.stderr
    assert "agreement with the base on" in out.stdout and "accuracy on" not in out.stdout


# --- the new-user hostile list (issue: no request can take the machine down, no input silently misread) ---

def test_a_truncated_imagenet_tar_is_one_line_in_data_sample_and_profile(tmp_path, capsys):
    tar = tmp_path / "trunc.tar"
    import tarfile

    with tarfile.open(tar, "w") as tf:  # a real archive cut short in its second member's data
        for i in range(3):
            f = tmp_path / f"n01440764_{i}.png"
            f.write_bytes(png_bytes(np.full((40, 40), i, np.uint8)))
            tf.add(f, arcname=f.name)
    tar.write_bytes(tar.read_bytes()[:1200])
    for out in (run_here(capsys, "data", "sample", f"imagenet:{tar}", "--out", str(tmp_path / "d"), "-n", "3"),
                run_here(capsys, "profile", "--zoo", "t", "--model", "test_resnet", "--num-classes", "3",
                         "--split", f"val=imagenet:{tar}", "--batch-sizes", "1")):
        one_line(out, f"{tar}: ", "truncated")
        assert "bug" not in out.stderr
    assert not (tmp_path / "d").exists()


def test_settings_files_that_are_not_yaml_mappings_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("zoo: x\nsplits: [a\n")
    text = tmp_path / "text.png"
    text.write_text("abc")
    binary = tmp_path / "real.png"
    binary.write_bytes(png_bytes(np.full((8, 8), 200, np.uint8)))
    one_line(run_here(capsys, "profile", "--config", str(bad)), f"{bad}: not valid YAML at line 3, column 1")
    one_line(run_here(capsys, "profile", "--config", str(text)), f"{text}: holds a str, not the mapping")
    one_line(run_here(capsys, "profile", "--config", str(binary)), f"{binary}: not a text file")
    one_line(run_here(capsys, "esn", "train", "--base", "resnet10t", "--saver", "mobilenetv3_small_075",
                      "--config", str(text), "--out", str(tmp_path / "e.pt")), "not the mapping of settings")


def test_esn_eval_refuses_a_tolerance_its_criterion_ignores_as_query_does(capsys):
    for cmd in (["query", "--base", "resnet10t"], ["esn", "eval", "--checkpoint", "none.pt"]):
        one_line(run_here(capsys, *cmd, "--criterion", "zero", "--tolerance", "2"),
                 "--criterion zero takes no tolerance, so --tolerance 2 would be ignored")


def test_hints_name_the_zoo_in_use(tmp_path, capsys):
    out = run_here(capsys, "query", "--zoo", "imagenet-lite", "--base", "tf_efficientnet_lite2.pypi_in1k")
    assert out.returncode == 0 and "tinysaver data sample foolbox --out imgs" in out.stdout, out.stdout
    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t")
    assert "tinysaver data sample fashion-mnist:test --out imgs" in out.stdout, out.stdout
    need_package("foolbox")
    out = run_here(capsys, "data", "sample", "foolbox", "--out", str(tmp_path / "f"), "-n", "2")
    assert out.returncode == 0 and "infer --zoo imagenet-lite --base tf_efficientnet_lite2.pypi_in1k" in out.stdout


def test_save_to_a_folder_is_refused_and_leaves_nothing(tmp_path, capsys):
    d = tmp_path / "sel"
    d.mkdir()
    one_line(run_here(capsys, "query", "--base", "resnet10t", "--save", str(d)),
             f"{d} is a folder; give a file name")
    assert list(d.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["sel"]


def test_a_copied_zoo_folder_runs(tmp_path, capsys):
    import shutil

    from tinysaver.zoo import bundled_root

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(bundled_root() / "fashion-mnist", copy)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.png").write_bytes(png_bytes(np.full((28, 28), 90, np.uint8)))
    out = run_here(capsys, "infer", "--zoo", str(copy), "--base", "resnet10t", "--quiet", str(tmp_path / "mine"))
    assert out.returncode == 0 and "a.png" in out.stdout, out.stderr[-2000:]


def test_a_hub_model_says_in_one_line_that_it_needs_hub_weights(monkeypatch, capsys):
    """The catalog zoo's models carry published facts and a timm name: without the Hub they fail at
    once (HF_HUB_OFFLINE honoured), not after a minute of retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # an empty cache, whatever this machine holds
    out = run_here(capsys, "esn", "train", "--zoo", "imagenet-catalog", "--base", "convnextv2_tiny.fcmae_ft_in1k",
                   "--saver", "convnextv2_atto.fcmae_ft_in1k", "--out", "/nonexistent/e.pt")
    one_line(out, "convnextv2_atto.fcmae_ft_in1k needs its pretrained weights from the Hugging Face Hub",
             "HF_HUB_OFFLINE is set")


def test_help_shows_defaults_and_lists_as_typed(capsys, tmp_path):
    out = run_here(capsys, "serve", "--help")
    assert "(default: 1)" in out.stdout and "[1]" not in out.stdout.replace("[-", "")
    out = run_here(capsys, "profile", "--help")
    assert "(default: 1 32)" in " ".join(out.stdout.split())
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(np.full((28, 28), 90, np.uint8)))
    out = run_here(capsys, "infer", "--base", "resnet10t", "--backend", "onnxruntime,openvino,eager", str(img))
    one_line(out, "one per stage (2 of them), got 3: onnxruntime,openvino,eager")
    assert "['" not in out.stderr


def test_serve_run_with_a_bad_argument_is_one_line_without_ray_s_traceback():
    import shutil

    need_package("ray")
    cli = shutil.which("serve")
    if cli is None:
        pytest.skip("Ray Serve's 'serve' command is not on PATH")
    out = subprocess.run([cli, "run", "tinysaver.serve:app", "zoo=fashion-mnist", "colour=red"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "Error: tinysaver.serve:app: colour: is not a known field\n" in out.stderr


def test_profile_names_where_units_run_executor_and_refuses_the_old_spelling(capsys):
    out = run_here(capsys, "profile", "--config", "zoo_index/configs/fashion-mnist.yaml", "--backend", "ray")
    one_line(out, "profile --backend ray is now --executor ray (local or ray); --backends names the model runtimes")
    out = run_here(capsys, "profile", "--help")
    assert "--executor {local,ray}" in out.stdout and "--backend " not in out.stdout.replace("--backends", "")


def test_the_light_commands_and_modules_do_not_load_torch():
    """An import stays inside a function only to keep these light: ``tinysaver query``/``zoo``/``select``
    answer without importing torch (seconds, and gigabytes on a CUDA build), and the serve builder
    without Ray's replicas' code. Fails when a module-level import pulls torch into them."""
    code = ("import sys, importlib\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(h for h in ('torch', 'timm', 'ray', 'onnxruntime', 'openvino') if h in sys.modules))")
    light = ["tinysaver.cli.main", "tinysaver.selector", "tinysaver.zoo", "tinysaver.serve.builders", "esn.cli",
             "tinysaver.defer"]
    out = subprocess.run([sys.executable, "-c", code, *light], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_profiler_imports_without_a_word_on_stderr():
    """torch's benchmark timer logs "No CUDA runtime is found" on a machine with a CUDA toolkit and
    no GPU (the machine this was written on has one); a profile's stderr must not carry it."""
    out = subprocess.run([sys.executable, "-c", "import tinysaver.measure, torch.utils.cpp_extension"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
