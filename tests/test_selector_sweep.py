"""The exact threshold sweep against brute force on small random data."""
import numpy as np
import pytest

from tinysaver.selector import SaverOrder, best_exit, clopper_pearson, feasible_exits


def brute_force(conf, s_correct, b_correct, criterion, tol=0.0):
    """Try every distinct threshold (plus 'nothing exits'); return the largest feasible exit count."""
    n = len(conf)
    base = b_correct.sum()
    best = 0
    ts = sorted(set(conf.tolist()), reverse=True)
    for t in ts:  # scanning t downward
        ex = conf >= t
        k = int(ex.sum())
        casc = s_correct[ex].sum() + b_correct[~ex].sum()
        if criterion == "zero":
            if casc >= base:
                best = max(best, k)
        elif criterion == "bounded":
            if casc >= base - tol / 100 * n - 1e-9:
                best = max(best, k)
        elif criterion == "subset":
            if s_correct[ex].sum() < b_correct[ex].sum():
                break
            best = k
    return best


def make(rng, n, ties, s_acc, b_acc):
    conf = rng.random(n)
    if ties:
        conf = np.round(conf * 5) / 5  # few distinct values: many ties
    return conf, rng.random(n) < s_acc, rng.random(n) < b_acc


@pytest.mark.parametrize("criterion", ["zero", "bounded", "subset"])
@pytest.mark.parametrize("ties", [False, True])
def test_sweep_matches_brute_force(criterion, ties):
    rng = np.random.default_rng(1)
    for trial in range(150):
        n = int(rng.integers(1, 40))
        s_acc, b_acc = rng.random(2)  # includes savers more accurate than their base
        conf, sc, bc = make(rng, n, ties, s_acc, b_acc)
        so = SaverOrder.build(conf, sc)
        k = best_exit(so, bc, criterion, tolerance=3.0, delta=0.1)
        assert k == brute_force(conf, sc, bc, criterion, tol=3.0), (trial, n)
        if k:
            assert (conf >= so.thresholds[k]).sum() == k  # the threshold reproduces the exit count


def test_no_exit_everything_exits_and_saver_better_than_base():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    # saver always right, base always wrong: everything exits
    so = SaverOrder.build(conf, np.ones(4, bool))
    assert best_exit(so, np.zeros(4, bool), "zero", 0, 0.1) == 4
    # saver always wrong, base always right: nothing may exit
    so = SaverOrder.build(conf, np.zeros(4, bool))
    assert best_exit(so, np.ones(4, bool), "zero", 0, 0.1) == 0
    # all confidences tied: all-or-nothing
    so = SaverOrder.build(np.full(4, 0.5), np.array([1, 1, 1, 0], bool))
    assert list(np.flatnonzero(so.valid)) == [0, 4]


def test_subset_rule_stops_at_first_dip_where_zero_loss_goes_on():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    s = np.array([1, 0, 1, 1], bool)
    b = np.array([1, 1, 0, 0], bool)
    so = SaverOrder.build(conf, s)
    assert best_exit(so, b, "subset", 0, 0.1) == 1
    assert best_exit(so, b, "zero", 0, 0.1) == 4


def test_clopper_pearson_limits():
    from scipy.stats import binomtest

    ci = binomtest(3, 50).proportion_ci(confidence_level=0.8, method="exact")
    assert clopper_pearson(np.array([3]), 50, 0.1, upper=True)[0] == pytest.approx(ci.high, rel=1e-6)
    assert clopper_pearson(np.array([3]), 50, 0.1, upper=False)[0] == pytest.approx(ci.low, rel=1e-6)


def test_guarantee_coverage_by_simulation():
    """Draw calibration sets from a known population; the chosen threshold's true loss must be ≤ ε
    in at least 1 − δ of the draws."""
    rng = np.random.default_rng(0)
    N = 20000
    conf_pop = rng.random(N)
    # saver correctness grows with confidence; base is right 80% of the time
    s_pop = rng.random(N) < 0.35 + 0.65 * conf_pop
    b_pop = rng.random(N) < 0.8
    eps, delta, n = 2.0, 0.2, 400
    fails = 0
    trials = 200
    for _ in range(trials):
        idx = rng.choice(N, n, replace=False)
        so = SaverOrder.build(conf_pop[idx], s_pop[idx])
        k = best_exit(so, b_pop[idx], "guaranteed", eps, delta)
        t = so.thresholds[k]
        ex = conf_pop >= t
        true_loss = (b_pop[ex].sum() - s_pop[ex].sum()) / N * 100
        fails += true_loss > eps
    assert fails / trials <= delta
    # and it is not vacuous: it lets samples exit in the typical draw
    assert k > 0


def test_bad_criterion():
    so = SaverOrder.build(np.array([0.5]), np.array([True]))
    with pytest.raises(ValueError, match="criterion"):
        feasible_exits(so, np.array([True]), "nonsense")
