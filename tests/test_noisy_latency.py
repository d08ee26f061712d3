"""Latency timed beside a CPU burner is re-timed, then stored as noisy; zoo show and the latency
cost warn about it, and --latency-only --noisy-only re-times just those rows."""
import subprocess
import sys
import warnings

import pytest
import torch

from tinysaver.measure import LoadMeter, latency_table, measure_latency

BURN = "import time\nt = time.time()\nwhile time.time() - t < 120:\n    pass\n"


@pytest.fixture
def burners():
    """Two busy processes for the duration of a test (2 cores here: more than half the machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]
    try:
        yield procs
    finally:
        for p in procs:  # each by its own pid
            p.kill()
            p.wait(timeout=30)


def test_the_load_meter_sees_a_burner_and_the_timing_is_marked_noisy(burners):
    meter = LoadMeter()
    meter.start()
    t = __import__("time").perf_counter()
    while __import__("time").perf_counter() - t < 0.5:
        pass
    other = meter.stop()
    if other is None:
        pytest.skip("no /proc/stat on this machine: the load cannot be measured")
    assert other > 0.5, other  # two burners on the cores, beside this loop
    lats = measure_latency(torch.nn.Conv2d(3, 4, 3), (3, 16, 16), [1], min_run_time=0.05, busy_retries=1)
    assert lats[0].noisy and "other processes kept" in lats[0].noisy and "after 2 tries" in lats[0].noisy
    row = latency_table(lats)["bs1"]
    assert row["noisy"] == lats[0].noisy and row["other_load"] > 0.5


def test_noisy_rows_are_shown_warned_about_and_re_timed_alone(tiny_zoo_cfg, tmp_path, monkeypatch, capsys):
    from tests.helpers import run_here
    from tinysaver import measure
    from tinysaver.profiler import profile, profile_latency
    from tinysaver.costs import model_cost
    from tinysaver.zoo import MANIFEST, atomic_write_yaml, load_zoo

    # the machine this runs on may be busy itself: the stored rows start clean, then one is marked
    monkeypatch.setattr(measure.LoadMeter, "stop", lambda self: 0.0)
    profile(tiny_zoo_cfg, tmp_path, progress=False)
    profile_latency("tiny", ["eager"], [1, 2], tmp_path, models=["test_resnet"], min_run_time=0.01, log=lambda s: None)
    z = load_zoo("tiny", tmp_path)
    table = z.manifest["models"]["test_resnet"]["backends"]["eager"]["latency"]["table"]
    table["bs1"]["noisy"] = "other processes kept 1.80 cores busy while timing"
    kept = dict(table["bs2"])
    atomic_write_yaml(z.path / MANIFEST, z.manifest)
    z = load_zoo("tiny", tmp_path)
    assert z.table().set_index("model").loc["test_resnet", "noisy"] == "bs1_eager"
    with pytest.warns(UserWarning, match="timed on a busy machine"):
        model_cost(z, "test_resnet", "latency:cpu:bs1:eager")
    out = run_here(capsys, "--root", str(tmp_path), "zoo", "show", "tiny")
    assert out.returncode == 0 and "warning: latency in the 'noisy' column" in out.stderr
    profile_latency("tiny", ["eager"], [1, 2], tmp_path, models=["test_resnet"], min_run_time=0.01,
                    log=lambda s: None, noisy_only=True)
    table = load_zoo("tiny", tmp_path).manifest["models"]["test_resnet"]["backends"]["eager"]["latency"]["table"]
    assert "noisy" not in table["bs1"] and table["bs1"]["other_load"] == 0.0
    assert table["bs2"] == kept  # the row that was fine was not touched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_cost(load_zoo("tiny", tmp_path), "test_resnet", "latency:cpu:bs1:eager")
