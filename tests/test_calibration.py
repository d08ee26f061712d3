"""Temperature scaling, ECE, conformal sets, and calibrated zoos through the selector and the cascade."""
import numpy as np
import pytest
import torch

from tinysaver.calibration import (
    cascade_conformal,
    conformal_quantile,
    coverage_and_size,
    ece,
    fit_temperature,
    prediction_sets,
    softmax_t,
    top_label_ece,
)


def _sampled(n=20000, k=5, t_true=3.0, seed=0):
    """Logits that are ``t_true`` times too sharp: labels drawn from softmax(logits / t_true)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return z * t_true, labels.numpy()


def test_fit_temperature_recovers_the_true_scale():
    logits, labels = _sampled()
    t = fit_temperature(logits, labels)
    assert 2.7 < t < 3.3
    assert ece(softmax_t(logits, t), labels) < ece(softmax_t(logits), labels) / 3


def test_ece_is_the_15_bin_top_label_gap():
    logits, labels = _sampled(n=3000, t_true=2.0, seed=1)
    p = softmax_t(logits).numpy()
    conf, pred = p.max(1), p.argmax(1)
    correct = pred == labels
    bins = np.minimum((conf * 15).astype(int), 14)  # equal-width bins; no confidence sits on an edge here
    want = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
               for b in range(15) if (bins == b).any())
    assert ece(p, labels) == pytest.approx(want, abs=1e-5)
    assert top_label_ece(conf, correct) == pytest.approx(want, abs=1e-5)


def test_bad_calibration_input_is_refused():
    with pytest.raises(ValueError, match="labelled split"):
        fit_temperature(torch.zeros(3, 2), np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(np.full((3, 2), 0.5), np.array([0, 1, 0]), 1.5)
    with pytest.raises(ValueError, match="temperature"):
        softmax_t(torch.zeros(1, 2), 0.0)


def test_conformal_quantile_matches_mapie_lac():
    pytest.importorskip("mapie")
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    logits, labels = _sampled(n=2000, t_true=1.0, seed=2)
    probs = softmax_t(logits).numpy()

    class Lookup(ClassifierMixin, BaseEstimator):  # a "model" whose input is the row index
        def fit(self, x, y):
            self.classes_ = np.arange(probs.shape[1])
            return self

        def predict_proba(self, x):
            return probs[np.asarray(x)[:, 0].astype(int)]

        def predict(self, x):
            return self.predict_proba(x).argmax(1)

    idx = np.arange(len(labels))[:, None]
    cal, tst = idx[:1000], idx[1000:]
    mp = SplitConformalClassifier(Lookup().fit(cal, labels[:1000]), confidence_level=0.9, conformity_score="lac",
                                  prefit=True).conformalize(cal, labels[:1000])
    _, ref = mp.predict_set(tst)
    ours = prediction_sets(probs[1000:], conformal_quantile(probs[:1000], labels[:1000], 0.1))
    assert (ours == ref[:, :, 0]).mean() > 0.999  # MAPIE's quantile interpolation may differ on a tie


def test_cascade_conformal_covers_per_stage_and_falls_back():
    logits, labels = _sampled(n=6000, t_true=1.0, seed=3)
    probs = softmax_t(logits).numpy()
    stage = (probs.max(1) > 0.6).astype(int)
    stage[:5] = 2  # a stage with too few calibration samples uses the pooled quantile
    sets, qs = cascade_conformal(probs[:3000], labels[:3000], stage[:3000], probs[3000:], stage[3000:], 0.1)
    cov, size = coverage_and_size(sets, labels[3000:])
    assert 0.88 <= cov <= 0.93 and 1.0 <= size < probs.shape[1]
    assert qs[2] == conformal_quantile(probs[:3000], labels[:3000], 0.1)
    for s in (0, 1):
        assert qs[s] == conformal_quantile(probs[:3000][stage[:3000] == s], labels[:3000][stage[:3000] == s], 0.1)


def test_calibrated_zoo_selector_and_cascade(tiny_zoo_cfg, tmp_path, monkeypatch):
    pytest.importorskip("torchmetrics")
    from tinysaver.calibration import calibrate_zoo
    from tinysaver.cascade import build_cascade
    from tinysaver.cli import main
    from tinysaver.data import load_dataset
    from tinysaver.profiler import profile
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import ZooError, load_zoo

    root = tmp_path / "zoos"
    tiny_zoo_cfg.models = tiny_zoo_cfg.models[:2]
    tiny_zoo_cfg.batch_sizes = [1]
    profile(tiny_zoo_cfg, root, progress=False, log=lambda s: None)
    z = load_zoo("tiny", root)
    with pytest.raises(ZooError, match="zoo calibrate"):
        z.calibrated_predictions("test_resnet", "a")
    with pytest.raises(ZooError, match="no split 'calib'"):
        calibrate_zoo("tiny", root=root, log=lambda s: None)
    calibrate_zoo("tiny", fit_split="a", root=root, log=lambda s: None)
    z = load_zoo("tiny", root)
    df = z.table()
    assert {"T", "ece_a", "ece_T_a", "ece_b"} <= set(df.columns)
    t = {m: z.temperature(m) for m in ("test_efficientnet", "test_resnet")}
    assert all(v != 1.0 for v in t.values())
    cal = z.calibrated_predictions("test_resnet", "a")
    raw = z.predictions("test_resnet", "a")
    assert np.array_equal(cal.pred, raw.pred) and not np.allclose(cal.conf, raw.conf)
    cfg = SelectorConfig(criterion="bounded", tolerance=100.0, calibrate="temperature", calib_split="a", test_split="b")
    sel = select(z, "test_resnet", cfg, savers=["test_efficientnet"]).best
    assert sel.temperatures == [t[m] for m in sel.models]
    again = type(sel).from_dict(sel.to_dict())
    assert again.temperatures == sel.temperatures
    # the cascade computes its confidences with the same temperatures the selector read, and
    # builds its models from the zoo it was given (resolving the plan reads no manifest again)
    with monkeypatch.context() as m:
        m.setattr("tinysaver.zoo.load_zoo", lambda *a, **k: pytest.fail("the zoo was loaded again"))
        casc = build_cascade(sel, z)
    ds = load_dataset(z.splits["a"]["source"], progress=False)
    res = casc.predict(ds.images, batch_size=4, all_stages=True)
    for i, m in enumerate(sel.models):
        np.testing.assert_allclose(res.stage_conf[i], z.calibrated_predictions(m, "a").conf, atol=1e-5)
    assert main(["--root", str(root), "zoo", "show", "tiny"]) == 0


def test_a_bad_temperature_is_refused():
    from tinysaver.policy import Selection, SelectionError

    d = Selection.manual("z", [("s", 0.5)], "b").to_dict()
    d["stages"][0]["temperature"] = -1
    with pytest.raises(SelectionError, match="temperature"):
        Selection.from_dict(d)
    d["stages"][0]["temperature"] = 0.5
    assert Selection.from_dict(d).temperatures == [0.5, 1.0]
