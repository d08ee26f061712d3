"""The pair sweep against brute force, the public-code subset rule, and the guarantee's coverage."""
import numpy as np
import pytest

from tinysaver.policy import apply
from tinysaver.risk import clopper_pearson, passes_wsr
from tinysaver.criteria import GUARANTEE_GRID
from tinysaver.sweep import SaverOrder, best_exit


def brute_force(conf, s_correct, b_correct, criterion, tol=0.0):
    """Try every distinct threshold (plus 'nothing exits'); return the largest feasible exit count."""
    n = len(conf)
    base = b_correct.sum()
    best = 0
    for t in sorted(set(conf.tolist()), reverse=True):
        ex = conf >= t
        casc = s_correct[ex].sum() + b_correct[~ex].sum()
        if casc >= base - (tol / 100 * n + 1e-9 if criterion == "bounded" else 0):
            best = max(best, int(ex.sum()))
    return best


def public_code_subset(conf, s_correct, b_correct):
    """The paper's public rule, written from its description: t = 1, 0.999, …; exits conf > t;
    stop at the first t where the saver is less accurate than the base on the exits."""
    for t in np.arange(1, 0, -0.001):
        ex = conf > t
        if ex.any() and s_correct[ex].mean() < b_correct[ex].mean():
            return int(ex.sum())
    return int((conf > np.arange(1, 0, -0.001)[-1]).sum())


def make(rng, n, ties, s_acc, b_acc):
    conf = 0.05 + 0.95 * rng.random(n)  # a max-softmax confidence is never 0
    if ties:
        conf = np.maximum(np.round(conf * 5) / 5, 0.2)  # few distinct values: many ties
    return conf, rng.random(n) < s_acc, rng.random(n) < b_acc


@pytest.mark.parametrize("criterion", ["zero", "bounded", "subset"])
@pytest.mark.parametrize("ties", [False, True])
def test_sweep_matches_brute_force(criterion, ties):
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(150):
        n = int(rng.integers(1, 40))
        s_acc, b_acc = rng.random(2)  # includes savers more accurate than their base
        conf, sc, bc = make(rng, n, ties, s_acc, b_acc)
        so = SaverOrder.build(conf, sc)
        k, t = best_exit(so, bc, criterion, tolerance=3.0, delta=0.1)
        want = public_code_subset(conf, sc, bc) if criterion == "subset" else brute_force(conf, sc, bc, criterion, 3.0)
        assert k == want, (trial, n, k, want)
        # the threshold reproduces the exit count through the one rule, and sits on no sample
        assert int((apply([conf], [t]) == 0).sum()) == k, (trial, t)
        assert not np.any(conf == t)
        checked += k > 0
    assert checked > 20  # the draws exercise real exits, not only "nothing exits"


def test_thresholds_lie_halfway_between_calibration_confidences():
    conf = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    so = SaverOrder.build(conf, np.ones(4, bool))
    k, t = best_exit(so, np.zeros(4, bool), "zero")
    assert k == 4 and t == pytest.approx(float(np.float32(0.6)) / 2)  # everything exits: half the lowest
    k, t = best_exit(SaverOrder.build(conf, np.array([1, 1, 0, 0], bool)), np.ones(4, bool), "zero")
    assert k == 2 and t == pytest.approx((float(np.float32(0.8)) + float(np.float32(0.7))) / 2)


def test_no_exit_everything_exits_and_ties():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    assert best_exit(SaverOrder.build(conf, np.ones(4, bool)), np.zeros(4, bool), "zero")[0] == 4
    k, t = best_exit(SaverOrder.build(conf, np.zeros(4, bool)), np.ones(4, bool), "zero")
    assert k == 0 and t == np.inf
    so = SaverOrder.build(np.full(4, 0.5), np.array([1, 1, 1, 0], bool))
    assert list(np.flatnonzero(so.valid)) == [0, 4]


def test_subset_takes_the_first_dip_like_the_public_code():
    conf = np.array([0.95, 0.85, 0.75, 0.65])
    s = np.array([1, 0, 1, 1], bool)
    b = np.array([1, 1, 0, 0], bool)
    so = SaverOrder.build(conf, s)
    # at t just under 0.85 the saver is 1/2 right on the exits and the base 2/2: that t is the answer
    assert best_exit(so, b, "subset")[0] == 2
    assert best_exit(so, b, "zero")[0] == 4


def test_clopper_pearson_limits():
    from scipy.stats import binomtest

    ci = binomtest(3, 50).proportion_ci(confidence_level=0.8, method="exact")
    assert clopper_pearson(np.array([3]), 50, 0.1, upper=True)[0] == pytest.approx(ci.high, rel=1e-6)
    assert clopper_pearson(np.array([3]), 50, 0.1, upper=False)[0] == pytest.approx(ci.low, rel=1e-6)


def test_wsr_test_rejects_only_with_evidence():
    rng = np.random.default_rng(0)
    small = np.where(rng.random(2000) < 0.01, 1, 0)       # loss 1 % ≪ ε = 5 %: certified
    large = np.where(rng.random(2000) < 0.10, 1, 0)       # loss 10 % > ε: never certified
    assert passes_wsr(np.stack([small, large]), 0.05, 0.1).tolist() == [True, False]


def test_guarantee_coverage_by_simulation_and_wsr_exits_more():
    """Draw calibration sets from a known population; each test's chosen threshold must have true
    loss ≤ ε in at least 1 − δ of the draws. On the same draws the betting (WSR) test must let at
    least as many samples exit as Clopper–Pearson: the reason it is the default."""
    rng = np.random.default_rng(0)
    N = 20000
    conf_pop = rng.random(N)
    s_pop = rng.random(N) < 0.35 + 0.65 * conf_pop  # saver correctness grows with confidence
    b_pop = rng.random(N) < 0.8
    eps, delta, n, trials = 2.0, 0.2, 400, 150
    fails = {"clopper-pearson": 0, "wsr": 0}
    exits = {"clopper-pearson": [], "wsr": []}
    for _ in range(trials):
        idx = rng.choice(N, n, replace=False)
        so = SaverOrder.build(conf_pop[idx], s_pop[idx])
        for method in fails:
            k, t = best_exit(so, b_pop[idx], "guaranteed", eps, delta, method)
            assert t == np.inf or t in GUARANTEE_GRID  # tested on the fixed grid
            ex = apply([conf_pop], [t]) == 0
            fails[method] += (b_pop[ex].sum() - s_pop[ex].sum()) / N * 100 > eps
            exits[method].append(ex.mean())
    for method in fails:
        assert fails[method] / trials <= delta, method
        assert np.median(exits[method]) > 0.05, method
    assert np.mean(exits["wsr"]) >= np.mean(exits["clopper-pearson"])


def test_bad_criterion():
    so = SaverOrder.build(np.array([0.5]), np.array([True]))
    with pytest.raises(ValueError, match="criterion"):
        best_exit(so, np.array([True]), "nonsense")


def test_subset_equals_the_public_rule_on_every_real_pair():
    """All 31 saver → base pairs of the two committed zoos (the issue found 13 that differed), and its
    example: convnext_atto ← regnety_002 exits 95.0 % at a threshold near 0.504."""
    from tinysaver.zoo import load_zoo

    pairs = 0
    for name, split in (("fashion-mnist", "calib"), ("imagenet-lite", "val")):
        zoo = load_zoo(name)
        models = sorted(zoo.measured(), key=lambda m: zoo.models[m]["flops"])
        preds = {m: zoo.predictions(m, split) for m in models}
        for i, base in enumerate(models):
            for saver in models[:i]:
                y = preds[base].labels
                s_ok, b_ok, conf = preds[saver].pred == y, preds[base].pred == y, preds[saver].conf
                k, t = best_exit(SaverOrder.build(conf, s_ok), b_ok, "subset")
                assert k == public_code_subset(conf, s_ok, b_ok), (name, saver, base)
                pairs += 1
                if (saver, base) == ("regnety_002", "convnext_atto"):
                    assert k / len(y) == pytest.approx(0.9508) and 0.503 < t < 0.504
    assert pairs == 31
