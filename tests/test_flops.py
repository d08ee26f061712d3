"""Both FLOP counters against the GMACs timm publishes, with random weights."""
import pytest
import timm
import torch
import torch.nn.functional as F

from tests.helpers import TIMM_RESULTS, need, need_package
from tinysaver.measure import count_flops


@pytest.mark.parametrize("arch", ["resnet50", "efficientvit_m0", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("counter", ["deepspeed", "torch"])
def test_counters_agree_with_published_gmacs(arch, counter):
    need(TIMM_RESULTS.is_dir(), "../shared/data/timm-results")
    from tinysaver.published import published_gmacs

    pub = published_gmacs(arch, 224, TIMM_RESULTS)
    m = timm.create_model(arch).eval()
    got = count_flops(m, (3, 224, 224), counter)
    assert got.counter == counter
    # the table rounds to 2 decimals: allow that rounding on top of the 3 % agreement
    assert abs(got.macs / 1e9 - pub) <= 0.03 * pub + 0.005, (arch, counter, got.macs / 1e9, pub)


class Attn(torch.nn.Module):
    def forward(self, x):
        q = x.view(2, 4, 16, 8)
        return F.scaled_dot_product_attention(q, q, q)


def test_torch_fallback_counts_cpu_fused_attention():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2 * 4 * 16 * 8)
    plain = FlopCounterMode(display=False)
    with plain, torch.inference_mode():
        Attn()(x)
    # QK^T and AV: 2 * (B*H*L*S*E) MACs each
    expect = 2 * 2 * (2 * 4 * 16 * 16 * 8)
    ours = count_flops(_with_param(Attn()), (1, 1, 1024), "torch")
    assert ours.flops == expect
    assert plain.get_total_flops() < expect  # the known torch trap this fallback exists for


def _with_param(mod):
    mod.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # counters find the device here
    return mod


@pytest.mark.parametrize("arch", ["mobilenetv3_large_100", "efficientformerv2_s0", "tf_efficientnet_lite0"])
def test_published_gmacs_are_fvcore_totals_that_add_batchnorm(arch):
    """timm's table (3-6 % above our counts on these) was made with fvcore, which adds one op per
    BatchNorm element and counts bilinear upsampling. An independent counter shows it: our MACs plus
    fvcore's BatchNorm/upsample share equal fvcore's total, which rounds to the published figure."""
    need(TIMM_RESULTS.is_dir(), "../shared/data/timm-results")
    need_package("fvcore")
    import logging

    from fvcore.nn import FlopCountAnalysis

    from tinysaver.published import published_gmacs

    pub = published_gmacs(arch, 224, TIMM_RESULTS)
    m = timm.create_model(arch).eval()
    ours = count_flops(m, (3, 224, 224), "deepspeed").macs / 1e9
    logging.disable(logging.WARNING)
    try:
        fca = FlopCountAnalysis(m, torch.randn(1, 3, 224, 224))
        fca.unsupported_ops_warnings(False)
        by_op = {k: v / 1e9 for k, v in fca.by_operator().items()}
        total = fca.total() / 1e9
    finally:
        logging.disable(logging.NOTSET)
    extra = by_op.get("batch_norm", 0) + by_op.get("upsample_bilinear2d", 0)
    assert abs(ours - pub) > 0.03 * pub  # the gap the issue reports is real
    assert ours + extra == pytest.approx(total, rel=0.005)  # conv, matmul, linear: identical counts
    assert abs(total - pub) <= 0.0051  # the table rounds fvcore's total to 2 decimals
