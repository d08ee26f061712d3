"""Gears (#48): the certified gear plan on the bundled Fashion zoo, its place in the selection file,
and the switch driven by a simulated queue (no clock)."""
import json

import numpy as np
import pytest

from tests.helpers import run_here
from tinysaver.criteria import GUARANTEE_GRID
from tinysaver.errors import SelectionError
from tinysaver.gears import Gear, GearBox, GearPlan, gear_plan, grid_ceiling, with_gears
from tinysaver.policy import Selection
from tinysaver.selector import SelectorConfig, select
from tinysaver.splits import calibration_and_test
from tinysaver.zoo import load_zoo

BASE, EPS, DELTA = "resnet10t", 1.0, 0.1


@pytest.fixture(scope="module")
def fashion():
    return load_zoo("fashion-mnist")


@pytest.fixture(scope="module")
def plan(fashion):
    return gear_plan(fashion, BASE, EPS, DELTA)


def test_every_gear_is_certified_by_its_own_level_at_a_split_delta(fashion, plan):
    """Each gear's threshold is a grid point that the guaranteed test of its level, run at δ/levels
    over the plan's saver, certified (the test certifies its cheapest threshold and every grid point
    above it); its calibration loss is within its level; and gear 0 is the zero-loss policy raised
    to the grid."""
    calib, _ = calibration_and_test(fashion, [BASE, plan.saver], None, None)
    conf, pred = calib.conf[plan.saver].astype(np.float64), calib.pred
    assert plan.levels >= 2 and plan.delta == DELTA and len(plan.gears) >= 3
    for g in plan.gears:
        assert g.threshold in GUARANTEE_GRID
        level = round(g.max_loss / EPS * plan.levels)
        assert 1 <= level <= plan.levels and g.max_loss <= EPS
        cfg = SelectorConfig(criterion="guaranteed", tolerance=g.max_loss, delta=DELTA / plan.levels)
        cheapest = select(fashion, BASE, cfg, savers=[plan.saver]).best.thresholds[0]
        assert g.threshold >= cheapest, (g, cheapest)
        exits = conf >= g.threshold
        harm = np.sum(exits & (pred[plan.saver] != calib.labels) & (pred[BASE] == calib.labels))
        repair = np.sum(exits & (pred[plan.saver] == calib.labels) & (pred[BASE] != calib.labels))
        assert 100 * (harm - repair) / len(conf) <= g.max_loss
        assert g.exit_ratio == pytest.approx(np.mean(exits))
    zero = select(fashion, BASE, SelectorConfig(), savers=[plan.saver]).best.thresholds[0]
    assert plan.gears[0].threshold == grid_ceiling(zero) >= zero
    # δ split: the top level's cheapest threshold at the whole δ is at most the plan's (a test at a
    # smaller δ never certifies more)
    whole = select(fashion, BASE, SelectorConfig(criterion="guaranteed", tolerance=EPS, delta=DELTA),
                   savers=[plan.saver]).best.thresholds[0]
    assert whole <= plan.gears[-1].threshold


def test_gears_are_ordered_by_cost_and_exit_more_as_they_go(plan):
    t = [g.threshold for g in plan.gears]
    cost = [g.cost for g in plan.gears]
    assert t == sorted(t, reverse=True) and len(set(t)) == len(t)
    assert cost == sorted(cost, reverse=True) and cost[-1] < cost[0]
    assert [g.exit_ratio for g in plan.gears] == sorted(g.exit_ratio for g in plan.gears)
    assert [g.max_loss for g in plan.gears] == sorted(g.max_loss for g in plan.gears)


def test_a_budget_that_certifies_no_cheaper_gear_is_refused_in_one_line(fashion):
    with pytest.raises(SelectionError, match="raise --max-loss") as e:
        gear_plan(fashion, BASE, 0.01, DELTA)
    assert "\n" not in str(e.value)
    with pytest.raises(SelectionError, match="above 0 and at most 100"):
        gear_plan(fashion, BASE, -1.0)


def test_the_plan_travels_in_the_selection_file_as_version_2(fashion, plan, tmp_path):
    sel = select(fashion, BASE, SelectorConfig()).best
    geared = with_gears(sel, plan)
    path = geared.save(tmp_path / "g.json")
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 2 and len(raw["gears"]["gears"]) == len(plan.gears)
    back = Selection.load(path)
    assert GearPlan.from_dict(back.gears) == plan
    # without gears a file stays version 1, as every earlier tinysaver reads it
    assert "gears" not in json.loads(sel.save(tmp_path / "plain.json").read_text())
    for broken, why in (({**raw, "schema_version": 1}, "with gears has schema version 2"),
                        ({**raw, "gears": None}, "with gears has schema version 2"),
                        ({**raw, "gears": {**raw["gears"], "saver": "resnet18"}}, "the gears are for resnet18"),
                        ({**raw, "gears": {**raw["gears"], "gears": raw["gears"]["gears"][:1]}}, "gears")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(SelectionError, match=why):
            Selection.load(bad)
    with pytest.raises(SelectionError, match="thresholds fall"):
        GearPlan.from_dict({**plan.to_dict(), "gears": [*raw["gears"]["gears"]][::-1]})


def test_query_prints_and_saves_the_gears(tmp_path, capsys):
    out = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", BASE, "--gears", "--max-loss", "1",
                   "--save", str(tmp_path / "g.json"))
    assert out.returncode == 0, out.stderr
    assert "every gear certified at once with probability ≥ 0.9" in out.stdout and "(the zero-loss policy)" in out.stdout
    assert Selection.load(tmp_path / "g.json").gears["max_loss"] == 1.0
    bad = run_here(capsys, "query", "--zoo", "fashion-mnist", "--base", BASE, "--gears")
    assert bad.returncode == 2 and "give both --gears and --max-loss" in bad.stderr


def simulate(box: GearBox, arrivals: list[int], capacity: float, ticks_per_s: int = 100) -> tuple[list, list]:
    """A queue served in ticks of 1/ticks_per_s s: ``arrivals[i]`` images arrive in tick i, and gear g
    serves capacity × cost[0] / cost[g] images per second. The box sees the queue, the gear's
    capacity and the arrivals of the last second. Returns the gear and the queue per tick."""
    queue, gears, sizes, budget = 0, [], [], 0.0
    for i, a in enumerate(arrivals):
        queue += a
        recent = sum(arrivals[max(0, i + 1 - ticks_per_s):i + 1]) * ticks_per_s / min(i + 1, ticks_per_s)
        g = box.decide(queue, 0.0, capacity * box.costs[0] / box.costs[box.gear], recent)
        budget += capacity * box.costs[0] / box.costs[g] / ticks_per_s
        served = min(queue, int(budget))
        budget -= served
        queue -= served
        if not queue:  # an idle server saves nothing up
            budget = min(budget, 1.0)
        gears.append(g)
        sizes.append(queue)
    return gears, sizes


def test_the_switch_holds_gear_0_at_low_load_and_climbs_under_overload_without_flapping():
    costs = [3.6, 3.3, 2.7, 2.6, 2.3]  # the Fashion plan's shape: the cheapest gear serves 1.57× gear 0
    box = GearBox(costs, target_ms=200.0)
    capacity = 100.0  # images/s in gear 0
    low = [1 if i % 2 == 0 else 0 for i in range(3000)]  # 50 img/s: half of capacity
    gears, _ = simulate(box, low, capacity)
    assert set(gears) == {0} and box.switches == []
    high = [3 if i % 2 == 0 else 0 for i in range(3000)]  # 150 img/s: more than gear 0, less than the cheapest
    gears, sizes = simulate(box, high, capacity)
    assert max(gears) >= 3 and gears[-1] > 0
    assert max(sizes[-1000:]) < capacity * 0.2 * 2  # the queue stays bounded: about the target's wait
    ups = len(box.switches)
    assert ups <= 3 * len(costs), box.switches  # hysteresis: no switch on every tick
    gears, _ = simulate(box, low, capacity)  # the load falls back: down to gear 0, one gear at a time
    assert gears[-1] == 0
    downs = box.switches[ups:]
    assert all(b == a - 1 for a, b, _ in downs if b < a)


def test_the_switch_refuses_nonsense():
    with pytest.raises(SelectionError):
        GearBox([1.0, 0.0], target_ms=100)
    with pytest.raises(SelectionError):
        GearBox([2.0, 1.0], target_ms=100, up=0.1, down=0.2)
    with pytest.raises(SelectionError, match="at least two gears"):
        GearPlan("s", "b", 1.0, 0.1, 4, "flops", 10, (Gear(0.9, 0.25, 0.5, 1.0),))


def test_the_service_refuses_gears_it_cannot_switch_in_one_line(fashion, plan):
    """--gears needs a latency target, a gear plan, the fused layout and a saver → base pair, and
    does not mix with --adapt; each refusal is one line, before anything is deployed."""
    from tinysaver.errors import ServeError
    from tinysaver.serve import ServeOptions, service_spec

    sel = select(fashion, BASE, SelectorConfig()).best
    for opts, why in ((dict(gears=True), "give both --gears and --latency-target-ms"),
                      (dict(latency_target_ms=100.0), "give both --gears and --latency-target-ms"),
                      (dict(gears=True, latency_target_ms=100.0, adapt=True, audit=0.1), "give one of them")):
        with pytest.raises(ServeError, match=why) as e:
            ServeOptions(**opts)
        assert "\n" not in str(e.value)
    geared = ServeOptions(gears=True, latency_target_ms=100.0, backend="eager")
    with pytest.raises(ServeError, match="needs a selection with a gear plan"):
        service_spec(sel, fashion, geared)
    with pytest.raises(ServeError, match="use --layout fused"):
        service_spec(with_gears(sel, plan), fashion, ServeOptions(gears=True, latency_target_ms=100.0,
                                                                   layout="per-stage"))
    spec = service_spec(with_gears(sel, plan), fashion, geared)
    assert spec.gears["gears"][0]["threshold"] == plan.gears[0].threshold
    from tinysaver.serve.options import ServiceSpec

    with pytest.raises(ServeError, match=r"\(ESN exits\)"):  # what `tinysaver esn serve --gears` builds
        ServiceSpec(spec.stages, geared, factory="esn.serve:esn_stages", gears=spec.gears)


def test_the_held_out_images_are_those_no_plan_was_fitted_to(fashion):
    """`held_out` names the samples `calibration_and_test` holds out, by index into their split:
    the whole test split where the zoo has calib and test, else the seeded half not calibrated on.
    What bench_gears scores the served answers on."""
    from tinysaver.splits import held_out

    lite = load_zoo("imagenet-lite")
    for zoo, models in ((fashion, [BASE, "mobilenetv3_small_075"]),
                        (lite, ["tf_efficientnet_lite2.pypi_in1k", "tf_efficientnet_lite0.pypi_in1k"])):
        calib, test = calibration_and_test(zoo, models, None, None, seed=3)
        split, idx = held_out(zoo, seed=3)
        whole = zoo.predictions(models[0], split)
        assert np.array_equal(whole.labels[idx], test.labels) and np.array_equal(whole.pred[idx], test.pred[models[0]])
        assert len(idx) == len(test.labels) and np.all(np.diff(idx) > 0)
    assert split == "val" and len(idx) == 500 and len(calib.labels) == 500
    assert not np.array_equal(held_out(lite, seed=3)[1], held_out(lite, seed=4)[1])


def test_a_replica_at_half_load_keeps_gear_0_through_poisson_bursts(plan):
    """A fused replica's gearing (`tinysaver.serve.fused.Gearing`) under Poisson arrivals at half
    its capacity, one image per batch, the batch it decides for not counted as waiting: the bursts
    of a Poisson stream do not move it off the zero-loss gear. Under twice the capacity, requests
    pile up behind the batch and it climbs, one gear first."""
    import random

    from tinysaver.serve.fused import Gearing

    def run(rate: float, capacity: float = 20.0, seconds: float = 600.0) -> Gearing:
        """One image per batch, first come first served; gear g takes cost[g] / cost[0] / capacity s."""
        g, rng = Gearing(plan.to_dict(), 2000.0), random.Random(5)  # a target of 40 service times
        g.served(0, 1, 1 / capacity)
        g.last = 0.0  # the simulated clock
        arrivals, t = [], 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            arrivals.append(t)
        free_at, told = 0.0, 0
        for k, at in enumerate(arrivals):
            start = max(at, free_at)
            while told < len(arrivals) and arrivals[told] <= start:  # the replica sees each arrival
                g.arrived(1, arrivals[told])
                told += 1
            gear = g.choose(1, told - k - 1, start - at, start)  # those arrived after it wait behind it
            free_at = start + g.costs[gear] / g.costs[0] / capacity
        return g

    calm = run(10.0)
    assert calm.box.switches == [] and calm.box.gear == 0
    busy = run(40.0, seconds=30.0)
    assert busy.box.gear > 0 and busy.box.switches[0][:2] == (0, 1)


def test_the_batch_being_decided_is_in_the_predicted_wait_but_is_no_backlog():
    box = GearBox([2.0, 1.0], target_ms=1000.0)
    assert box.decide(0, 0.0, capacity=10.0, arrivals=15.0, serving=1) == 0  # a lone request outpaced by a burst
    assert box.decide(1, 0.0, capacity=10.0, arrivals=15.0, serving=1) == 1  # one behind it: the arrivals win
    late = GearBox([2.0, 1.0], target_ms=1000.0)
    assert late.decide(0, 0.0, capacity=10.0, arrivals=1.0, serving=6) == 1  # 6 images: 600 ms > half the target
