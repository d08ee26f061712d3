"""A new user's first hour: tinysaver installed from its wheel (not an editable checkout) answers the
README's first command from any folder, with the bundled zoos, and writes where a user expects."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment holding only the wheel; the dependencies already installed here
    are reached through a path entry (so the checkout's editable install is not)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, timeout=600, cwd=tmp)
    [wheel] = (tmp / "dist").glob("tinysaver-*.whl")
    assert wheel.stat().st_size <= 100 * 2**20  # the wheel-size decision: zoos and checkpoints in it
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # a plain path line: the packages installed here, without running their .pth files (the
    # editable finder of the checkout lives in one)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=600)
    home = tmp / "home"
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
           "PYTHONNOUSERSITE": "1"}
    env.pop("TINYSAVER_ZOO_ROOT", None)
    work = tmp / "somewhere"
    work.mkdir()
    return {"bin": env_dir / "bin" / "tinysaver", "py": py, "env": env, "cwd": work, "site": site, "home": home}


def run(inst, *args):
    return subprocess.run([str(inst["bin"]), *args], capture_output=True, text=True, env=inst["env"],
                          cwd=inst["cwd"], timeout=600)


def test_the_wheel_answers_the_first_command_from_any_folder(installed):
    where = subprocess.run([str(installed["py"]), "-c", "import tinysaver; print(tinysaver.__file__)"],
                           capture_output=True, text=True, env=installed["env"], cwd=installed["cwd"])
    assert where.stdout.startswith(str(installed["site"])), where  # the wheel, not the checkout
    r = run(installed, "query", "--zoo", "fashion-mnist", "--base", "resnet10t")
    assert r.returncode == 0, r.stderr
    assert "saver: mobilenetv3_small_075" in r.stdout
    r = run(installed, "zoo", "list", "--paths")
    assert r.returncode == 0 and f"{installed['site'] / 'tinysaver' / 'zoo_index'}" in r.stdout, r.stdout
    (installed["cwd"] / "zoo_index").mkdir()  # a folder of that name no longer hides the bundled zoos
    assert run(installed, "zoo", "show", "fashion-mnist").returncode == 0


def test_infer_on_the_bundled_zoo_and_an_import_from_an_empty_folder(installed):
    imgs = installed["cwd"] / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (imgs / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    r = run(installed, "infer", "--zoo", "fashion-mnist", "--base", "resnet10t", "--quiet", str(imgs))
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 9, r.stderr
    rec = installed["cwd"] / "m_val.csv"
    rows = "".join(f"s{i},{i % 3},0.9,{i % 3}\n" for i in range(30))
    rec.write_text("id,pred,conf,label\n" + rows)
    costs = installed["cwd"] / "costs.csv"
    costs.write_text("model,gmacs\nm,1.0\n")
    r = run(installed, "zoo", "import", "mine", str(rec), "--costs", str(costs))
    assert r.returncode == 0, r.stderr
    written = installed["home"] / "data" / "tinysaver" / "zoos" / "mine" / "zoo.yaml"
    assert written.is_file() and str(written.parent) in r.stdout + r.stderr
    assert not (installed["site"] / "tinysaver" / "zoo_index" / "mine").exists()
    r = run(installed, "zoo", "list")
    assert "mine" in r.stdout and "user" in r.stdout, r.stdout
