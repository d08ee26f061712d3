import numpy as np
import pytest
import torch

from tinysaver.cascade import Cascade, CascadeError
from tinysaver import ModelSpec, create_model


def tiny(name, n=3, **kw):
    torch.manual_seed(hash(name) % 1000)
    return create_model(ModelSpec(name, num_classes=n, **kw))


def offline_reference(stages, thresholds, images):
    """Run every model on the whole input, then apply the thresholds in order."""
    from tinysaver.transforms import prepare_batch

    outs = []
    with torch.inference_mode():
        for m in stages:
            prob = m.module(prepare_batch(images, m.preprocess)).softmax(-1)
            c, p = prob.max(-1)
            outs.append((p.numpy(), c.numpy()))
    n = len(images)
    pred, conf, stage = np.empty(n, int), np.empty(n, np.float32), np.empty(n, int)
    for j in range(n):
        for i, (p, c) in enumerate(outs):
            if i == len(outs) - 1 or c[j] >= thresholds[i]:
                pred[j], conf[j], stage[j] = p[j], c[j], i
                break
    return pred, conf, stage


@pytest.fixture(scope="module")
def mixed_images():
    g = torch.Generator().manual_seed(0)
    imgs = []
    for i in range(23):
        c = 1 if i % 5 == 0 else 3
        h, w = 20 + i, 40 - i // 2
        imgs.append(torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g))
    return imgs


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_shrinking_matches_offline_reference(mixed_images, batch_size):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40), tiny("test_vit")]
    confs = [np.median(offline_reference(stages, [0, 0], mixed_images)[1])]  # a threshold that splits the batch
    thresholds = [float(confs[0]), 0.34]
    ref = offline_reference(stages, thresholds, mixed_images)
    cas = Cascade(stages, thresholds)
    for shrink, refill in ((True, True), (True, False), (False, True)):
        res = cas.predict(mixed_images, batch_size=batch_size, shrink=shrink, refill=refill)
        assert np.array_equal(res.stage, ref[2])
        assert np.array_equal(res.pred, ref[0])
        # fp32 kernels may pick other blockings at other batch sizes: allow float noise only
        np.testing.assert_allclose(res.conf, ref[1], rtol=1e-5, atol=1e-6)
    assert 0 < (ref[2] == 0).sum() < len(mixed_images)  # the test exercises both exits


def test_refill_runs_later_stages_on_full_batches(mixed_images):
    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40), tiny("test_vit")]
    confs = offline_reference(stages, [0, 0], mixed_images)[1]
    thresholds = [float(np.quantile(confs, 0.4)), 0.0]  # about 60% of samples go on past the first saver
    seen = {i: [] for i in range(3)}
    for i, m in enumerate(stages):
        m.module.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(len(args[0])))
    ref = offline_reference(stages, thresholds, mixed_images)
    for refill in (True, False):
        for v in seen.values():
            v.clear()
        res = Cascade(stages, thresholds).predict(mixed_images, batch_size=4, refill=refill)
        assert np.array_equal(res.stage, ref[2]) and np.array_equal(res.pred, ref[0])
        survivors = int((ref[2] > 0).sum())
        assert sum(seen[1]) == survivors and sum(seen[0]) == len(mixed_images)
        if refill:  # every batch is full except possibly each stage's last one
            assert all(b == 4 for b in seen[1][:-1]) and len(seen[1]) == -(-survivors // 4)
        else:
            assert len(seen[1]) > -(-survivors // 4)  # per-chunk leftovers make more, smaller batches
    assert not seen[2]  # a threshold of 0 answers everything at the second stage


def test_all_stages_and_exit_ratios(mixed_images):
    stages = [tiny("test_efficientnet"), tiny("test_resnet")]
    res = Cascade(stages, [0.0]).predict(mixed_images, all_stages=True)
    assert (res.stage == 0).all() and res.exit_ratios == [1.0, 0.0]
    assert res.stage_pred.shape == (2, len(mixed_images))
    assert np.array_equal(res.stage_pred[0], res.pred)
    res = Cascade(stages, [1.01 - 1e-9 if False else 1.0]).predict(mixed_images)
    assert (res.stage == 1).all()  # softmax of 3 classes never reaches 1.0 here


def test_bad_cascades_rejected(mixed_images):
    a, b = tiny("test_efficientnet", n=3), tiny("test_resnet", n=5)
    with pytest.raises(CascadeError, match="class spaces"):
        Cascade([a, b], [0.5])
    with pytest.raises(CascadeError, match=r"\[0, 1\]"):
        Cascade([a, tiny("test_resnet")], [1.5])
    with pytest.raises(CascadeError, match="thresholds"):
        Cascade([a, tiny("test_resnet")], [])
    with pytest.raises(CascadeError, match="empty"):
        Cascade([a], []).predict([])


def test_compare_with_base_reports_both_paths(mixed_images):
    from tinysaver.cascade import compare_with_base

    stages = [tiny("test_efficientnet", input_size=32), tiny("test_resnet", input_size=40)]
    labels = np.arange(len(mixed_images)) % 3
    t = float(np.median(offline_reference(stages[:1], [], mixed_images)[1]))
    ref = offline_reference(stages, [t], mixed_images)
    rows = compare_with_base(Cascade(stages, [t]), mixed_images, labels, batch_sizes=(1, 4), repeats=1)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["cascade_img_s"] > 0 and r["cascade_norefill_img_s"] > 0 and r["base_img_s"] > 0
        assert r["exit_ratio"] == pytest.approx((ref[2] == 0).mean())
        assert r["cascade_acc"] == pytest.approx((ref[0] == labels).mean())
    with pytest.raises(CascadeError, match="saver → base"):
        compare_with_base(Cascade(stages[:1], []), mixed_images, labels)
