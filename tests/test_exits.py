"""The related early-exit methods in esn/: SDN, ZTW, gates, label-free exits, and their comparison."""
import copy

import numpy as np
import pytest
import torch

from esn.compare import CompareSettings, SaverOnly, parse_families, train_methods
from esn.exits import dynamic_predict, exit_flops, offline_outputs
from esn.gates import Gates, gate_targets, train_gates
from esn.label_free import tolerance_thresholds
from esn.policy import ExitPolicy
from esn.sdn import SDN
from esn.train import TrainSettings, frozen_features, train_esn
from esn.ztw import ZTW


ALL = ["esn", "sdn", "ztw", "gates", "label-free"]


@pytest.fixture(scope="module")
def trained(pair, data):
    cache = frozen_features(pair, data.images)
    s = CompareSettings(epochs=2, esn={"batch_size": 16, "dim": 16})
    return cache, train_methods(pair, data, cache, ALL, s, log=lambda m: None)


@pytest.fixture(scope="module")
def methods(trained):
    cache, ms = trained
    return cache, {name: em.module for name, em in ms.items()}


def test_every_method_is_trained_seeded_and_carries_its_own_rules(pair, data, trained):
    cache, ms = trained
    again = train_methods(pair, data, cache, list(reversed(ALL)),
                          CompareSettings(epochs=2, esn={"batch_size": 16, "dim": 16}), log=lambda m: None)
    # the table's order is the registry's, whatever order the families were asked in
    assert list(again) == list(ms)
    for name, em in ms.items():  # seeded: whatever ran before, the same weights
        for (k, v), w in zip(em.module.state_dict().items(), again[name].module.state_dict().values()):
            assert torch.equal(v, w), (name, k)
    assert isinstance(ms["saver cascade"].module, SaverOnly)
    assert isinstance(ms["SDN"].module, SDN) and isinstance(ms["label-free SDN"].module, SDN)
    gates = next(em for em in ms.values() if isinstance(em.module, Gates))
    # the gates sit on a frozen copy of the SDN's exits: the same weights, not the same tensors
    for (k, v), w in zip(gates.module.exits.state_dict().items(), ms["SDN"].module.state_dict().values()):
        assert torch.equal(v, w) and v.data_ptr() != w.data_ptr(), k
    ztw, conn, ens = (ms[n].module for n in ("ZTW", "ZTW (connections only)", "ZTW (ensembling only)"))
    assert ztw.cascade and ztw.ensemble and conn.cascade and not conn.ensemble
    assert not ens.cascade and ens.ensemble
    for (k, v), w in zip(ztw.heads.state_dict().items(), conn.heads.state_dict().values()):
        assert torch.equal(v, w), k  # connections only: ZTW's classifiers without its ensemble
    # what the comparison treats differently is carried by the row, not read off its name
    assert sorted(n for n, em in ms.items() if em.calibrated) == ["label-free SDN", "label-free saver + ESN"]
    out = offline_outputs(ms["label-free SDN"].module, cache, data.labels)
    s = CompareSettings(lf_tolerance=2.0)
    assert ms["label-free SDN"].own_rule(out, s) == tolerance_thresholds(out["preds"], out["confs"],
                                                                          out["base_pred"], 2.0)
    assert gates.own_rule(offline_outputs(gates.module, cache, data.labels), s) == [0.5] * gates.module.num_exits
    assert [n for n, em in ms.items() if em.own_rule] == [gates_name(ms), "label-free SDN", "label-free saver + ESN"]


def gates_name(ms) -> str:
    return next(n for n, em in ms.items() if isinstance(em.module, Gates))


@pytest.mark.parametrize("calibrated", [False, True])
def test_dynamic_inference_equals_the_offline_policy_for_every_method(pair, data, methods, calibrated):
    cache, ms = methods
    for name, m in ms.items():
        n_exits = m.num_exits + int(m.uses_saver)
        temps = list(np.linspace(0.7, 1.6, n_exits + 1)) if calibrated else None
        out = offline_outputs(m, cache, data.labels, temps)
        # each exit's threshold at the median score of the samples still open there: every exit answers some
        open_, th = np.ones(len(data), bool), []
        for c in out["confs"]:
            th.append(float(np.median(c[open_])))
            open_ &= c < th[-1]
        pol = ExitPolicy(th, temps)
        ref, ref_where = pol.apply(out["preds"], out["confs"], out["base_pred"])
        assert len(np.unique(ref_where)) == n_exits + 1, name
        for bs in (1, 7, 48):
            ans, where = dynamic_predict(pair, m, pol, data.images, batch_size=bs)
            assert np.array_equal(where, ref_where) and np.array_equal(ans, ref), (name, bs)


@pytest.mark.parametrize("calibrate", [None, "temperature"])
def test_calibrated_policy_is_the_greedy_policy_on_the_given_split(pair, data, methods, calibrate):
    """What 'tinysaver serve --esn' runs with: choose_policy on the split's outputs, with fitted
    temperatures when asked (one per exit and the base head)."""
    from esn.exits import fit_temperatures
    from esn.policy import calibrated_policy, choose_policy

    cache, ms = methods
    esn = ms["saver + ESN"]
    pol = calibrated_policy(None, pair, esn, "bounded", 5.0, calibrate=calibrate, split=data)
    temps = fit_temperatures(esn, cache, data.labels) if calibrate else None
    out = offline_outputs(esn, cache, data.labels, temps)
    want = choose_policy(out["preds"], out["confs"], out["base_pred"], data.labels, "bounded", 5.0)
    assert pol.thresholds == want.thresholds and len(pol.thresholds) == esn.num_exits + 1
    if calibrate:
        assert pol.temperatures == pytest.approx(temps) and len(temps) == esn.num_exits + 2
        assert any(abs(t - 1) > 1e-3 for t in temps)
    else:
        assert pol.temperatures is None
    with pytest.raises(ValueError, match="calibrate must be one of"):
        calibrated_policy(None, pair, esn, calibrate="platt", split=data)


def test_ztw_cascade_connections_cannot_see_later_stages():
    torch.manual_seed(0)
    for ensemble in (False, True):
        m = ZTW((6, 8, 10), 5, cascade=True, ensemble=ensemble)
        feats = [torch.randn(4, c) for c in (6, 8, 10)]
        a = m(feats)
        b = m(feats[:2] + [feats[2] + 5 * torch.randn(4, 10)])
        torch.testing.assert_close(a[:2], b[:2])
        assert not torch.allclose(a[2], b[2])
    # and the stopped gradient: exit 2's loss does not reach classifier 1
    m = ZTW((6, 8), 5, cascade=True, ensemble=False)
    out = m([torch.randn(4, 6), torch.randn(4, 8)])
    out[1].sum().backward()
    g0 = m.heads[0].weight.grad
    assert (g0 is None or not g0.any()) and m.heads[1].weight.grad.abs().sum() > 0


def test_geometric_ensemble_of_one_exit_equals_that_exit():
    torch.manual_seed(0)
    m = ZTW((6, 8, 10), 5, cascade=True, ensemble=True)
    feats = [torch.randn(4, c) for c in (6, 8, 10)]
    ens, ics = m(feats), m(feats, ensembled=False)
    torch.testing.assert_close(ens[0].softmax(-1), ics[0].softmax(-1))
    # exit 3 with every weight but its own at zero (and b = 1) is exit 3 alone too
    with torch.no_grad():
        m.log_w[2, :2] = -float("inf")
    torch.testing.assert_close(m(feats)[2].softmax(-1), ics[2].softmax(-1))
    # while with the earlier exits weighted in, it is not
    with torch.no_grad():
        m.log_w[2, :2] = 0.0
    assert not torch.allclose(m(feats)[2].softmax(-1), ics[2].softmax(-1))


def test_label_free_training_reads_no_label(pair, data):
    cache = frozen_features(pair, data.images)
    shuffled = copy.copy(data)
    shuffled.labels = np.random.default_rng(0).permutation(data.labels)
    s = CompareSettings(epochs=1, esn={"batch_size": 16, "dim": 8})
    a = train_methods(pair, data, cache, ["label-free"], s, log=lambda m: None)
    b = train_methods(pair, shuffled, cache, ["label-free"], s, log=lambda m: None)
    for name in ("label-free SDN", "label-free saver + ESN"):
        for (k, v), w in zip(a[name].module.state_dict().items(), b[name].module.state_dict().values()):
            assert torch.equal(v, w), (name, k)
    # the supervised SDN does read them: the same check fails there
    a = train_methods(pair, data, cache, ["sdn"], s, log=lambda m: None)["SDN"].module
    b = train_methods(pair, shuffled, cache, ["sdn"], s, log=lambda m: None)["SDN"].module
    assert not torch.equal(a.heads[0].weight, b.heads[0].weight)
    # an ESN trained label-free on data without any label at all
    unlabelled = copy.copy(data)
    unlabelled.labels = np.full(len(data), -1)
    train_esn(pair, unlabelled, TrainSettings(epochs=1, batch_size=16, dim=8, label_free=True),
              log=lambda m: None, progress=False, cache=cache)


def test_tolerance_rule_spends_t_over_2_to_the_n():
    rng = np.random.default_rng(0)
    n, t = 2000, 4.0
    base = rng.integers(0, 5, n)
    preds = np.stack([np.where(rng.random(n) < a, base, (base + 1) % 5) for a in (0.6, 0.8, 0.9)])
    confs = np.clip((preds == base) * 0.4 + rng.random((3, n)) * 0.6, 0, 1)
    th = tolerance_thresholds(preds, confs, base, t)
    open_ = np.ones(n, bool)
    for i, thr in enumerate(th):
        take = open_ & (confs[i] >= thr)
        disagree = 100 * (take & (preds[i] != base)).sum() / n
        assert disagree <= t / 2 ** (i + 1) + 1e-9
        # the rule takes the most it can: one more sample (the next lower score) would break it
        rest = np.flatnonzero(open_ & (confs[i] < thr))
        if len(rest):
            j = rest[np.argmax(confs[i][rest])]
            more = 100 * ((take & (preds[i] != base)).sum() + (preds[i][j] != base[j])) / n
            assert more > t / 2 ** (i + 1) or preds[i][j] == base[j] and (confs[i][rest] == confs[i][j]).sum() > 1
        open_ &= ~take
    with pytest.raises(ValueError, match="tolerance"):
        tolerance_thresholds(preds, confs, base, -1)


def test_gate_targets_pick_the_cheapest_exit():
    k = 3
    y = torch.tensor([0, 1])
    good, bad = torch.tensor([8.0, 0, 0]), torch.tensor([0, 0, 8.0])
    # sample 0 is right at exit 1 already; sample 1 only at the base head
    exits = torch.stack([torch.stack([good, bad]), torch.stack([good, bad])])
    base = torch.stack([good, torch.tensor([0, 8.0, 0])])
    t = gate_targets(exits, base, y, np.array([0.3, 0.6, 1.0]), lam=1.0)
    assert t.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # with no cost at all, leaving late is never worse, so only a strictly better exit is taken
    assert exits.shape[-1] == k


def test_gates_learn_to_separate_easy_from_hard():
    torch.manual_seed(0)
    n, k = 400, 4
    y = torch.randint(0, k, (n,))
    easy = torch.rand(n) < 0.5
    logits = torch.randn(n, k)
    logits[easy, y[easy]] += 6  # confident and right on the easy half
    base = torch.zeros(n, k)
    base[torch.arange(n), y] = 6
    sdn = SDN((4,), k)
    g = Gates(sdn)
    train_gates(g, logits[None], base, y, np.array([0.2, 1.0]), lam=1.0, epochs=300)
    with torch.no_grad():
        score = g.score(1, logits)
    assert score[easy].mean() > 0.8 and score[~easy].mean() < 0.3
    assert not any(p.requires_grad for p in g.exits.parameters())


def test_exit_flops_add_up(pair, methods):
    _, ms = methods
    for name, m in ms.items():
        f = exit_flops(pair, m)
        per = f["per_exit"]
        assert len(per) == m.num_exits + int(m.uses_saver) + 1, name
        assert np.all(np.diff(per) > 0), name
        assert per[-1] == pytest.approx(f["saver"] + f["base_total"] + f["overhead"], rel=0.02), name
    assert isinstance(ms["saver cascade"], SaverOnly)


def test_unknown_method_is_refused():
    assert parse_families("sdn, ztw,sdn") == ["sdn", "ztw"]
    with pytest.raises(ValueError, match="choose from"):
        parse_families("sdn,branchynet")


def test_exits_compare_cli(tiny_zoo_cfg, tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("matplotlib")
    import json

    from tinysaver.cli import main
    from tinysaver.profiler import profile

    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[:2]
    tiny_zoo_cfg.batch_sizes = [1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    args = ["--root", str(root), "exits", "compare", "--zoo", "tiny", "--base", "test_resnet", "--saver",
            "test_efficientnet", "--epochs", "1", "--wallclock-images", "8", "--png", str(png), "--json", str(js)]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())
    names = [r["method"] for r in rows]
    assert names[:2] == ["base alone", "saver cascade"] and "ZTW (ensembling only)" in names
    for r in rows[1:]:
        assert r["dynamic_match"] == 1.0, r["method"]
        assert 0 < r["zero_loss_flops_pct"] <= 100 + 1e-6
    assert "| method | 25% |" in out and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["--root", str(root), "exits", "compare", "--zoo", "tiny", "--base", "test_resnet",
                 "--saver", "test_efficientnet", "--methods", "esn,nope"]) == 2


def test_training_regimes(tiny_zoo_cfg, tmp_path):
    from esn.regimes import RegimeSettings, train_regime
    from esn.train import esn_splits
    from tinysaver.profiler import profile
    from tinysaver.zoo import load_zoo

    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[1:2]
    tiny_zoo_cfg.batch_sizes = [1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    zoo = load_zoo("tiny", root)
    train, _, _ = esn_splits(zoo)
    ref = {k: v.clone() for k, v in zoo.load_model("test_resnet").module.state_dict().items()}
    s = RegimeSettings(joint_samples=16, mixed_samples=16, heads_epochs=1, batch_size=8)

    def same(module):
        return all(torch.equal(v, ref[k]) for k, v in module.state_dict().items())

    base, sdn = train_regime(zoo, "test_resnet", "disjoint", train, s)
    assert same(base.module) and sdn.num_exits == 4
    base, _ = train_regime(zoo, "test_resnet", "mixed", train, s)
    assert not same(base.module) and not any(p.requires_grad for p in base.module.parameters())
    joint, _ = train_regime(zoo, "test_resnet", "joint", train, s)
    fresh, _ = train_regime(zoo, "test_resnet", "joint", train, s)
    assert not same(joint.module)
    for (k, v), w in zip(joint.module.state_dict().items(), fresh.module.state_dict().values()):
        assert torch.equal(v, w), k  # seeded: the same run twice gives the same weights
    with pytest.raises(ValueError, match="regime must be"):
        train_regime(zoo, "test_resnet", "alternating", train, s)


@pytest.mark.parametrize("refill, pipeline", [(True, False), (True, True), (False, True)])
def test_dynamic_inference_gains_refill_and_pipelining_with_the_same_answers(pair, data, methods, refill, pipeline):
    """ESN inference runs on the shared engine: refill and pipelining change only the batches."""
    cache, ms = methods
    for name in ("saver + ESN", *[k for k in ms if k != "saver + ESN"][:1]):
        m = ms[name]
        out = offline_outputs(m, cache, data.labels)
        open_, th = np.ones(len(data), bool), []
        for c in out["confs"]:
            th.append(float(np.median(c[open_])))
            open_ &= c < th[-1]
        pol = ExitPolicy(th)
        ref, ref_where = pol.apply(out["preds"], out["confs"], out["base_pred"])
        for bs in (1, 7):
            ans, where = dynamic_predict(pair, m, pol, data.images, batch_size=bs, refill=refill, pipeline=pipeline)
            assert np.array_equal(where, ref_where) and np.array_equal(ans, ref), (name, bs)
