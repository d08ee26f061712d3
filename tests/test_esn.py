import numpy as np
import pytest
import torch

from esn.model import ESNConfig, ExitSequenceNetwork, esn_loss
from esn.policy import ExitPolicy, choose_policy, dynamic_predict, offline_exit_outputs
from esn.staged import staged
from esn.train import TrainSettings, frozen_features, load_esn, save_esn, train_esn
from tinysaver.models import ModelSpec, create_model


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext",
                                  "mobilenetv3_small_050", "regnetx_002"])
def test_stage_split_reproduces_the_model(name):
    m = create_model(ModelSpec(name, num_classes=3)).module
    sm = staged(m)
    x = torch.randn(2, 3, 64, 64) if name != "test_vit" else torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        feats, logits = sm.forward_all(x)
        torch.testing.assert_close(logits, m(x))
        if name in ("test_resnet", "regnetx_002", "test_convnext"):  # timm's own stage outputs
            ref = m.forward_intermediates(x, intermediates_only=True)
            assert len(ref) - len(feats) == (0 if name == "test_convnext" else 1)  # ResNet/RegNet list the stem first
            for a, b in zip(feats, ref[len(ref) - len(feats):]):
                torch.testing.assert_close(a, b)


def make_esn(layers=1, dim=32, stages=(8, 16, 24), saver_dim=12, k=5):
    torch.manual_seed(0)
    return ExitSequenceNetwork(ESNConfig(saver_dim, stages, k, dim=dim, num_layers=layers))


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_every_exit_equals_the_saver_at_init(layers):
    esn = make_esn(layers)
    sf, sl = torch.randn(6, 12), torch.randn(6, 5)
    feats = [torch.randn(6, c, 3, 3) for c in (8, 16, 24)]
    out = esn(sf, feats, sl)
    assert out.shape == (3, 6, 5)
    for n in range(3):
        assert torch.equal(out[n], sl)


@pytest.mark.parametrize("layers", [0, 2])
def test_causality_later_features_do_not_change_earlier_exits(layers):
    esn = make_esn(layers)
    for h in esn.heads:  # non-zero heads so exits depend on the bus
        torch.nn.init.normal_(h.weight)
    sf, sl = torch.randn(4, 12), torch.randn(4, 5)
    feats = [torch.randn(4, c) for c in (8, 16, 24)]
    a = esn(sf, feats, sl)
    feats2 = feats[:2] + [feats[2] + 10 * torch.randn_like(feats[2])]
    b = esn(sf, feats2, sl)
    torch.testing.assert_close(a[:2], b[:2])
    assert not torch.allclose(a[2], b[2])
    # and the prefix path used by dynamic inference gives the same exits
    toks = esn.embed(sf, feats)
    for n in (1, 2, 3):
        torch.testing.assert_close(esn.exit_logits(toks, n, sl), a[n - 1], rtol=1e-5, atol=1e-5)


def test_loss_weights_follow_the_formula():
    torch.manual_seed(0)
    exits = torch.randn(2, 5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    sl = torch.randn(5, 3)
    w = 2 * (1 - torch.softmax(sl, -1).max(-1).values)
    manual = sum((w * torch.nn.functional.cross_entropy(e, y, reduction="none")).mean() for e in exits)
    torch.testing.assert_close(esn_loss(exits, y, sl), manual)
    # a fully confident saver sample contributes nothing
    sl2 = sl.clone()
    sl2[0] = torch.tensor([100.0, 0, 0])
    per = esn_loss(exits[:, :1], y[:1], sl2[:1])
    assert per.item() == pytest.approx(0.0, abs=1e-6)


def test_training_never_touches_the_backbones(pair, data):
    before = {k: v.clone() for k, v in pair.base.module.state_dict().items()}
    for cache in (True, False):
        settings = TrainSettings(epochs=1, batch_size=16, feature_cache=cache, dim=8, num_layers=1,
                                 mixup=0.0 if cache else 0.8, cutmix=0.0 if cache else 1.0,
                                 autoaugment=not cache)
        esn = train_esn(pair, data, settings, log=lambda s: None, progress=False)
    assert all(p.grad is None for p in pair.base.module.parameters())
    assert all(p.grad is None for p in pair.saver.module.parameters())
    for k, v in pair.base.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(h.weight.abs().sum() > 0 for h in esn.heads)  # the ESN itself did learn


def test_cache_refuses_augmentation():
    with pytest.raises(ValueError, match="feature cache"):
        TrainSettings(feature_cache=True, mixup=0.8)


def test_dynamic_inference_matches_offline_policy(pair, data):
    esn = train_esn(pair, data, TrainSettings(epochs=2, batch_size=16, dim=16), log=lambda s: None, progress=False)
    feats = frozen_features(pair, data.images)
    preds, confs = offline_exit_outputs(esn, feats)
    base_pred = feats["base_logits"].argmax(-1).numpy()
    # thresholds at the median confidence of each exit so that every exit answers some samples
    pol = ExitPolicy([float(np.median(c)) for c in confs])
    ref, ref_where = pol.apply(preds, confs, base_pred)
    for bs in (1, 7, 48):
        ans, where = dynamic_predict(pair.saver, pair.base, pair.base_staged, esn, pol, data.images, batch_size=bs)
        assert np.array_equal(where, ref_where) and np.array_equal(ans, ref)
    assert len(np.unique(ref_where)) >= 3


def test_policy_zero_loss_on_calibration():
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 3, n)
    base_pred = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3)
    preds = np.stack([np.where(rng.random(n) < a, labels, (labels + 2) % 3) for a in (0.6, 0.7, 0.75)])
    confs = np.clip((preds == labels) * 0.3 + rng.random((3, n)) * 0.7, 0, 1)
    pol = choose_policy(preds, confs, base_pred, labels, "zero")
    ans, _ = pol.apply(preds, confs, base_pred)
    assert (ans == labels).mean() >= (base_pred == labels).mean()
    assert (np.array(pol.thresholds) < np.inf).any()


def test_checkpoint_round_trip_and_refusal(pair, data, tmp_path):
    esn = train_esn(pair, data, TrainSettings(epochs=1, batch_size=16, dim=8), log=lambda s: None, progress=False)
    f = tmp_path / "esn.pt"
    save_esn(f, esn, pair, TrainSettings(epochs=1, dim=8))
    loaded, ck = load_esn(f, saver="saver", base="base")
    assert (ck.saver, ck.base, ck.granularity, ck.path) == ("saver", "base", TrainSettings().granularity, f)
    for k, v in esn.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(ValueError, match="trained for base 'base'"):
        load_esn(f, base="other")


def test_esn_cli_train_and_eval(tiny_zoo_cfg, tmp_path, capsys):
    from tinysaver.cli import main
    from tinysaver.profiler import profile

    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[:2]
    tiny_zoo_cfg.batch_sizes = [1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    cfg = tmp_path / "esn.yaml"
    cfg.write_text("epochs: 2\nbatch_size: 4\ndim: 8\nnum_layers: 1\n")
    ck = tmp_path / "esn.pt"
    args = ["--root", str(root), "esn", "train", "--zoo", "tiny", "--base", "test_resnet", "--saver",
            "test_efficientnet", "--config", str(cfg), "--out", str(ck)]
    assert main(args) == 0 and ck.is_file()
    assert main(["--root", str(root), "esn", "eval", "--zoo", "tiny", "--checkpoint", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "saver + ESN" in out and "| 25% |" in out and "100.0% identical" in out
    assert main(["--root", str(root), "esn", "eval", "--zoo", "tiny", "--checkpoint", str(ck),
                 "--base", "test_efficientnet"]) == 2
    # --limit: a quick look on the first images of calib and test; train is not decoded to evaluate
    from esn.train import esn_splits
    from tinysaver.zoo import load_zoo

    train, calib, test = esn_splits(load_zoo("tiny", root), limit=2, train=False)
    assert train is None and len(calib) == 2 and len(test) == 2
    assert main(["--root", str(root), "esn", "eval", "--zoo", "tiny", "--checkpoint", str(ck), "--limit", "2"]) == 0
    assert "saver + ESN" in capsys.readouterr().out


def test_guaranteed_exit_policy_covers_its_loss_by_simulation():
    """The ESN's guaranteed thresholds (Learn-then-Test on one shared-threshold path): over seeded
    calibration draws from a known population, the true loss against the base exceeds ε in at most
    δ of the draws, and the policy does exit samples early."""
    from esn.policy import ExitPolicy, choose_policy

    rng = np.random.default_rng(7)
    N, n, n_exits, eps, delta, draws = 20000, 500, 3, 3.0, 0.2, 100
    labels = np.zeros(N, dtype=np.int64)
    base_pred = np.where(rng.random(N) < 0.88, 0, 1)
    confs = rng.random((n_exits, N)) ** np.array([[1.0], [0.7], [0.5]])  # later exits more confident
    # exit i is right with a probability that grows with its confidence and with i
    acc = 0.35 + 0.6 * confs * np.array([[0.8], [0.9], [1.0]])
    preds = np.where(rng.random((n_exits, N)) < acc, 0, 1)

    def true_loss(pol: ExitPolicy) -> float:
        ans, _ = pol.apply(preds, confs, base_pred)
        return 100 * ((base_pred == labels).mean() - (ans == labels).mean())

    fails = exited = 0
    for _ in range(draws):
        idx = rng.choice(N, n, replace=False)
        pol = choose_policy(preds[:, idx], confs[:, idx], base_pred[idx], labels[idx], "guaranteed", eps, delta)
        assert len(set(pol.thresholds)) == 1  # one shared threshold: the path fixed in advance
        fails += true_loss(pol) > eps
        exited += np.isfinite(pol.thresholds[0])
    # the guarantee is a probability over draws: allow two binomial standard deviations of 100 draws
    # (0.08). Thresholds picked by the empirical loss alone (bounded, ε = 3) fail in 0.8 of them.
    assert fails / draws <= delta + 2 * np.sqrt(delta * (1 - delta) / draws)
    assert exited >= draws // 2
    # a tighter ε never exits more
    loose = choose_policy(preds[:, :n], confs[:, :n], base_pred[:n], labels[:n], "guaranteed", 5.0, delta)
    tight = choose_policy(preds[:, :n], confs[:, :n], base_pred[:n], labels[:n], "guaranteed", 0.5, delta)
    assert tight.thresholds[0] >= loose.thresholds[0]


def test_feature_extraction_shows_progress_when_labelled(pair, data, capsys):
    """esn eval extracts calib and test features for a minute: its bar says so on stderr, and the
    features are the same with or without it."""
    from esn.train import frozen_features

    capsys.readouterr()
    quiet = frozen_features(pair, data.images, batch_size=8)
    assert capsys.readouterr().err == ""
    shown = frozen_features(pair, data.images, batch_size=8, desc="esn eval: test features")
    err = capsys.readouterr().err
    assert "esn eval: test features" in err and "/6 [" in err, err  # a bar over the 6 batches
    torch.testing.assert_close(shown["base_logits"], quiet["base_logits"])
