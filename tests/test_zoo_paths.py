"""Where zoos are read and written: one search path (--root, $TINYSAVER_ZOO_ROOT, the user data
folder, the bundled zoos), writes never into the bundled zoos, and packaged configs by name."""
import os
from pathlib import Path

import pytest

from tests.helpers import run_here, write_zoo
from tinysaver.zoo import (MANIFEST, bundled_root, default_root, find_zoos, is_bundled, load_zoo, search_path,
                           user_root, writable, zoo_summaries)


def test_the_search_path_is_root_env_user_then_bundled(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSAVER_ZOO_ROOT", str(tmp_path / "env"))
    labels = [label for label, _ in search_path(tmp_path / "r")]
    assert labels == ["--root", "$TINYSAVER_ZOO_ROOT", "user", "bundled"]
    assert default_root(tmp_path / "r") == tmp_path / "r" and default_root() == tmp_path / "env"
    monkeypatch.delenv("TINYSAVER_ZOO_ROOT")
    assert default_root() == user_root() and not is_bundled(user_root())
    assert str(user_root()).startswith(os.environ["XDG_DATA_HOME"])  # the test session's own


def test_a_zoo_in_a_higher_place_shadows_the_bundled_one_and_is_said(tmp_path, capsys):
    write_zoo(tmp_path)
    (tmp_path / "syn").rename(tmp_path / "fashion-mnist")
    rows = {r["zoo"]: r for r in zoo_summaries(tmp_path)}
    assert rows["fashion-mnist"]["where"] == "--root (shadows bundled)" and rows["imagenet-lite"]["where"] == "bundled"
    assert load_zoo("fashion-mnist", tmp_path).path == tmp_path / "fashion-mnist"
    assert load_zoo("fashion-mnist").path == bundled_root() / "fashion-mnist"
    r = run_here(capsys, "--root", str(tmp_path), "zoo", "list")
    assert "--root (shadows bundled)" in r.stdout, r.stdout
    r = run_here(capsys, "zoo", "list", "--paths")
    assert str(bundled_root()) in r.stdout and f"writes go to  {user_root()}" in r.stdout, r.stdout


def test_a_write_to_a_bundled_zoo_goes_to_a_copy_in_the_write_root(tmp_path):
    bundled = load_zoo("fashion-mnist")
    before = (bundled.path / MANIFEST).read_bytes()
    said = []
    copy = writable(bundled, tmp_path, said.append)
    assert copy.path == tmp_path / "fashion-mnist" and not is_bundled(copy.path)
    assert said and str(copy.path) in said[0] and "shadows the bundled one" in said[0]
    assert (bundled.path / MANIFEST).read_bytes() == before
    # the copy still finds its savers' checkpoints, recorded relative to the bundled zoos' folder
    assert Path(copy.model_spec("resnet10t").checkpoint).is_file()
    assert writable(copy, tmp_path, said.append).path == copy.path and len(said) == 1  # copied once
    assert [n for n, label, *_ in find_zoos(tmp_path) if label == "--root"] == ["fashion-mnist"]


def test_export_caches_never_go_beside_a_checkpoint(monkeypatch, tmp_path):
    from tinysaver.backends._export import default_cache_dir
    from tinysaver.models import ModelSpec, create_model

    model = load_zoo("fashion-mnist").load_model("mobilenetv3_small_050")
    monkeypatch.delenv("TINYSAVER_CACHE", raising=False)
    assert not is_bundled(default_cache_dir(model)) and "exports" == default_cache_dir(model).name
    monkeypatch.setenv("TINYSAVER_CACHE", str(tmp_path))
    assert default_cache_dir(create_model(ModelSpec("test_resnet", num_classes=3))) == tmp_path / "exports"


@pytest.mark.parametrize("name, folder", [("imagenet-lite", "zoo_index/configs"), ("default", "esn/configs")])
def test_packaged_configs_are_found_by_name_from_any_folder(name, folder, tmp_path, monkeypatch):
    from esn.cli import esn_config
    from tinysaver.cli.profile import profile_config

    monkeypatch.chdir(tmp_path)
    find = profile_config if folder.startswith("zoo_index") else esn_config
    assert find(name).resolve() == (Path(__file__).resolve().parent.parent / folder / f"{name}.yaml")
    (tmp_path / "mine.yaml").write_text("{}")
    assert find("mine.yaml") == Path("mine.yaml")  # a path still works
