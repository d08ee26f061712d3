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
    for shrink in (True, False):
        res = cas.predict(mixed_images, batch_size=batch_size, shrink=shrink)
        assert np.array_equal(res.stage, ref[2])
        assert np.array_equal(res.pred, ref[0])
        # fp32 kernels may pick other blockings at other batch sizes: allow float noise only
        np.testing.assert_allclose(res.conf, ref[1], rtol=1e-5, atol=1e-6)
    assert 0 < (ref[2] == 0).sum() < len(mixed_images)  # the test exercises both exits


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
