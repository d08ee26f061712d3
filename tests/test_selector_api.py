"""Selector API and CLI on a synthetic zoo stored in the real zoo_index format."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import run_here, write_zoo
from tinysaver.report import CONCEPTS, describe, headline, render
from tinysaver.policy import SelectionError
from tinysaver.selector import PolicyRequest, SelectorConfig, select, select_all, selection_for
from tinysaver.zoo import ZooError, load_zoo


@pytest.fixture
def zoo(tmp_path):
    write_zoo(tmp_path)
    return load_zoo("syn", tmp_path)


def test_query_picks_cheapest_feasible_saver_and_reports_both_splits(zoo):
    result = select(zoo, "m3", SelectorConfig(max_stages=2), top=3)
    sel, table = result.best, result.table()
    assert sel.found and sel.calib_split == "calib" and sel.test_split == "test"
    assert sel.acc_cascade_calib >= sel.acc_base_calib  # zero loss on calibration
    assert sel.cost_cascade < sel.cost_base and 0 < sel.saving_pct < 100
    # brute force over savers: nobody else has a lower cost under the same rule
    for s in ("m0", "m1", "m2"):
        other = select(zoo, "m3", SelectorConfig(max_stages=2), savers=[s]).best
        assert other.cost_cascade >= sel.cost_cascade - 1e-9
    assert list(table["saver"])[0] == sel.savers[0].model and result.candidates[0] is sel
    # the candidates: at most top, cheapest first, every one cheaper than the base, and each one
    # what the selector reports for that policy when asked for it alone
    costs = [c.cost_cascade for c in result.candidates]
    assert 1 < len(costs) <= 3 and costs == sorted(costs) and max(costs) < sel.cost_base
    assert list(table["saving_%"]) == [round(c.saving_pct, 2) for c in result.candidates]
    text = render(result)
    assert text.startswith(headline(sel) + "\n\ndetails") and describe(sel) in text and "next best candidates" in text
    assert all(c.savers[0].model in text for c in result.candidates[1:])
    assert sum(sel.exit_ratio_test) == pytest.approx(1.0)


def test_tolerance_never_costs_more_and_latency_cost(zoo):
    z = select(zoo, "m3", SelectorConfig(max_stages=2)).best
    b = select(zoo, "m3", SelectorConfig(criterion="bounded", tolerance=2.0, max_stages=2)).best
    assert b.cost_cascade <= z.cost_cascade and b.acc_cascade_calib >= b.acc_base_calib - 0.02 - 1e-9
    lat = select(zoo, "m3", SelectorConfig(cost="latency:cpu:bs1", max_stages=2)).best
    assert lat.cost_metric == "latency:cpu:bs1" and lat.cost_base == 4.0


def test_label_free_uses_agreement_with_base(zoo):
    sel = select(zoo, "m3", SelectorConfig(label_free=True, criterion="bounded", tolerance=5, max_stages=2)).best
    assert sel.target == "base-agreement" and sel.acc_base_calib == 1.0


def test_chain_only_reported_when_it_beats_two_stages(zoo):
    two = select(zoo, "m3", SelectorConfig(max_stages=2)).best
    three = select(zoo, "m3", SelectorConfig(max_stages=3)).best
    assert len(two.stages) == 2 and len(three.stages) == 3  # this zoo has a chain that beats every pair
    assert three.cost_cascade < two.cost_cascade and three.acc_cascade_calib >= three.acc_base_calib
    assert all(r > 0 for r in three.exit_ratio_calib[:2])  # every saver answers something
    with pytest.raises(SelectionError, match="longer chains"):
        SelectorConfig(max_stages=4)
    with pytest.raises(SelectionError, match="two-stage rule"):
        SelectorConfig(criterion="subset", max_stages=3)


def test_no_cheaper_model_means_run_base_alone(zoo):
    result = select(zoo, "m0")
    sel = result.best
    assert not sel.found and sel.message.startswith("no saver: run the base alone")
    assert sel.cost_cascade == sel.cost_base and result.candidates == [] and result.table().empty
    assert render(result) == headline(sel) + f"\n\ndetails (the terms are explained in {CONCEPTS}):\n" + describe(sel)
    assert headline(sel) == "No smaller model can answer for m0 here (no cheaper model in the zoo): it runs alone."


def test_bad_input(zoo, tmp_path):
    with pytest.raises(ZooError, match="not in zoo"):
        select(zoo, "m9")
    with pytest.raises(SelectionError, match="≥ 0"):
        SelectorConfig(tolerance=-1)
    with pytest.raises(SelectionError, match="δ"):
        SelectorConfig(delta=1.0)
    zoo.models["m1"]["num_classes"] = 7
    with pytest.raises(SelectionError, match="class spaces differ"):
        select(zoo, "m3", savers=["m1"])
    # predictions made on other samples than the split: refused
    zoo2 = load_zoo("syn", tmp_path)
    zoo2.splits["test"]["fingerprint"] = "0" * 16
    with pytest.raises(ZooError, match="fingerprint"):
        select(zoo2, "m3")


def test_select_all_one_row_per_base(zoo):
    from tinysaver.policy import answers, apply

    sels, df = select_all(zoo, SelectorConfig(max_stages=2))
    assert list(df["base"]) == ["m0", "m1", "m2", "m3"]
    assert df.loc[0, "saver"] == "(none)"
    found = 0
    for s, (_, row) in zip(sels, df.iterrows()):
        if not s.found:
            continue
        found += 1
        # each row, recomputed from the stored predictions with the rule itself
        preds = [zoo.predictions(m, "calib") for m in s.models]
        stage = apply(np.array([p.conf for p in preds[:-1]]), s.thresholds)
        answer = answers(np.array([p.pred for p in preds]), stage)
        assert row["exit_ratio"] == pytest.approx((stage < len(s.models) - 1).mean(), abs=1e-4)
        assert row["acc_cascade_calib"] == pytest.approx(100 * (answer == preds[-1].labels).mean(), abs=0.01)
        assert (answer == preds[-1].labels).mean() >= (preds[-1].pred == preds[-1].labels).mean()  # zero loss
    assert found >= 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinysaver.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_query_select_plot(zoo, tmp_path, capsys):
    root = str(tmp_path)
    out = run_cli("--root", root, "query", "--zoo", "syn", "--base", "m3", "--save", str(tmp_path / "sel.json"))
    assert out.returncode == 0, out.stderr
    assert "saver:" in out.stdout and "saving" in out.stdout and "(held out)" in out.stdout
    sel = json.loads((tmp_path / "sel.json").read_text())
    assert sel["base"] == "m3" and sel["stages"][-1]["threshold"] is None
    out = run_here(capsys, "--root", root, "select", "--zoo", "syn", "--out", str(tmp_path / "table"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "table.csv").read_text().startswith("base,saver")
    assert (tmp_path / "table.md").read_text().startswith("| base | saver")
    out = run_here(capsys, "--root", root, "plot", "--zoo", "syn", "--base", "m3", "--saver", "m1", "--out",
                   str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    out = run_here(capsys, "--root", root, "query", "--zoo", "syn", "--base", "m3", "--tolerance", "-1")
    assert out.returncode == 2 and "≥ 0" in out.stderr
    out = run_here(capsys, "--root", root, "query", "--zoo", "nope", "--base", "m3")
    assert out.returncode == 2 and "syn" in out.stderr.split("known zoos: ")[1].strip().split(", ")


@pytest.mark.parametrize("label_free", [False, True])
def test_zero_and_bounded_report_their_clopper_pearson_bound_and_warn_on_small_calibration(zoo, label_free):
    from tinysaver.risk import loss_upper_bound
    from tinysaver.splits import load_split_data

    cfg = SelectorConfig(criterion="bounded", tolerance=1.0, label_free=label_free)
    sel = select(zoo, "m3", cfg).best
    calib = load_split_data(zoo, "calib", sel.models)
    target = calib.pred["m3"] if label_free else calib.labels
    ans, _ = calib.outcome(sel.stages, target)
    base_ok, ok = calib.pred["m3"] == target, ans == target
    want = 100 * loss_upper_bound(int((base_ok & ~ok).sum()), int((ok & ~base_ok).sum()), len(target), 0.1)
    assert sel.calib_samples == len(target) < 1000 and sel.cp_bound_points == pytest.approx(float(want))
    text = describe(sel)
    what = "agreement with the base" if label_free else "accuracy against the base"
    assert f"Clopper–Pearson (δ = 0.1, {len(target)} calibration samples): at most {sel.cp_bound_points:.2f} points of " \
           f"{what}" in text
    assert f"warning: {len(target)} calibration samples say little" in text and "--criterion guaranteed" in text
    # guaranteed carries its own statement instead; a large calibration split does not warn
    g = select(zoo, "m3", SelectorConfig(criterion="guaranteed", tolerance=5.0)).best
    assert g.cp_bound_points is None and "Clopper–Pearson (δ" not in describe(g)
    import dataclasses

    assert "say little" not in describe(dataclasses.replace(sel, calib_samples=5000))


def test_a_criterion_that_certifies_nothing_says_which_tolerance_would(capsys):
    from tests.helpers import run_here

    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t", "--criterion", "guaranteed")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("no saver"))
    import re

    m = re.search(r"at ε = 0 points; at ε = ([\d.]+) a saver would be selected \(--tolerance ([\d.]+)\)", line)
    assert m and m.group(1) == m.group(2), line
    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t", "--criterion", "guaranteed",
                   "--tolerance", m.group(1))
    assert out.returncode == 0 and "saver: " in out.stdout and "no saver" not in out.stdout, out.stdout[:500]


def test_a_saving_is_never_printed_as_minus_zero(capsys):
    """A label-free latency query whose best is the base alone printed "saving -0.0%"."""
    from tests.helpers import run_here

    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t", "--cost", "latency:cpu:bs1",
                   "--label-free")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cost:"))
    assert "(saving 0.0%)" in line and "-0.0" not in out.stdout, line


@pytest.mark.parametrize("kw, words", [
    ({}, "give --base"),
    ({"base": "m3", "savers": ["m0"], "from_selection": True}, "--from-selection runs the selector"),
    ({"selection": "s.json", "savers": ["m0"]}, "not both"),
    ({"base": "m3", "threshold": 0.5}, "exactly one --saver"),
    ({"base": "m3", "savers": ["m0", "m1"], "threshold": 0.5}, "exactly one --saver"),
])
def test_a_policy_request_is_refused_before_any_zoo_loads(kw, words):
    with pytest.raises(SelectionError, match=words):
        PolicyRequest(**kw)


def test_a_policy_request_gives_the_policy_it_names(zoo, tmp_path):
    by_hand = selection_for(zoo, PolicyRequest("m3", savers=["m0"], threshold=0.7))
    assert by_hand.models == ["m0", "m3"] and by_hand.thresholds == [0.7] and by_hand.zoo == zoo.name
    chosen = selection_for(zoo, PolicyRequest("m3", SelectorConfig(max_stages=2)))
    assert chosen.to_dict() == select(zoo, "m3", SelectorConfig(max_stages=2)).best.to_dict()
    f = tmp_path / "sel.json"
    f.write_text(json.dumps(chosen.to_dict()))
    assert selection_for(zoo, PolicyRequest(selection=str(f))).to_dict() == chosen.to_dict()
    with pytest.raises(SelectionError, match="not 'm2'"):
        selection_for(zoo, PolicyRequest("m2", selection=str(f)))


def test_query_opens_with_the_answer_in_plain_words(capsys):
    """The first answer was jargon ("criterion zero, target labels", "exit ratio", "calib"); it now opens
    with one sentence of numbers a reader can check against the details below it."""
    from tinysaver.report import headline
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    sel = select(load_zoo("fashion-mnist"), "resnet10t", SelectorConfig()).best
    share = sel.cost_cascade / sel.cost_base
    assert headline(sel) == (f"mobilenetv3_small_075 answers {sel.exit_ratio_calib[0]:.0%} of images alone; the cascade "
                             f"keeps resnet10t's accuracy ({100 * sel.acc_cascade_calib:.2f} % on the 10,000 "
                             f"calibration images) at {share:.0%} of its compute.")
    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t")
    lines = out.stdout.splitlines()
    assert lines[0] == headline(sel) and lines[2].startswith("details (the terms are explained in docs/concepts.md)")
    quiet = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", "resnet10t", "--quiet")
    assert quiet.stdout == headline(sel) + "\n"
    free = select(load_zoo("fashion-mnist"), "resnet10t", SelectorConfig(label_free=True)).best
    assert f"the cascade gives resnet10t's own answer on {100 * free.acc_cascade_calib:.2f} % of the 10,000 " \
        "calibration images" in headline(free)
