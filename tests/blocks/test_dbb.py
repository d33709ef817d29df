"""The Diverse Branch Block (kind "dbb"), exact and fast: fusion over the Conv2d option space, init, gradients,
problems."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from reparam_cases import (
    assert_gradients_reach_every_kernel_and_scale,
    check_exact_fusion,
    check_preserve,
    conv_and_input,
    conv_as,
    conv_configs,
    grads_after_backward,
    padded,
    randomize_bn,
    randomize_scales,
    relative_error,
)  # fmt: skip
from torch import nn

from acnet_convert import ACNetError, acify, deploy
from acnet_convert.blocks.dbb import DBBlock, FastDBBlock, average_pool
from acnet_convert.blocks.registry import block_class

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=conv_configs(dilation=False))
def test_exact_block_equals_its_fused_conv(cfg):
    err64, err32 = check_exact_fusion(DBBlock, cfg)
    assert err64 <= 1e-10  # relative, float64
    assert err32 <= 1e-5  # relative, float32


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=conv_configs(dilation=False))
def test_fast_composed_kernel_equals_the_sum_of_its_branches(cfg):
    conv, _, x = conv_and_input(cfg)
    block = FastDBBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    weight, bias = block.equivalent_kernel()
    with torch.no_grad():
        got = conv_as(block, x, weight, bias)
        assert relative_error(got, block(x)) <= 1e-12  # relative: forward runs that very conv
        assert relative_error(got, block.fuse()(x)) <= 1e-12  # relative: fuse() holds that kernel
        want = _fast_branches(block, x)
    assert relative_error(want, got) <= 1e-10  # relative, float64


def _fast_branches(block: FastDBBlock, x: torch.Tensor) -> torch.Tensor:
    """The fast block's four branches run one by one on the padded input, each scaled per output channel."""
    xp, g, stride = padded(block, x), block.groups, block.stride
    out = _scaled(F.conv2d(xp, block.weight, None, stride, groups=g), block.scale_square)
    if block.bias is not None:
        out = out + block.bias.reshape(1, -1, 1, 1)
    (kh, kw), (h, w) = block.kernel_size, out.shape[-2:]
    if block.weight_1x1 is not None:
        centre = xp[..., kh // 2 :: stride[0], kw // 2 :: stride[1]][..., :h, :w]
        out = out + _scaled(F.conv2d(centre, block.weight_1x1, groups=g), block.scale_1x1)
    pooled = xp if block.weight_avg is None else F.conv2d(xp, block.weight_avg, groups=g)
    out = out + _scaled(F.avg_pool2d(pooled, block.kernel_size, stride), block.scale_avg)
    inner = F.conv2d(xp, block.weight_inner, groups=g)
    return out + _scaled(F.conv2d(inner, block.weight_outer, None, stride, groups=g), block.scale_kxk)


def _scaled(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return y * scale.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [DBBlock, FastDBBlock])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(cfg=conv_configs(dilation=False))
def test_preserve_init_computes_what_the_conv_and_bn_did(cls, cfg):
    assert check_preserve(cls, cfg) <= 1e-6  # relative, float64


@pytest.mark.parametrize("padding", [0, 1, 3, (2, 0), "same"])
def test_pooled_and_1x1_kxk_branches_are_exact_on_their_own(padding):
    """Each composed branch alone (others' last BN at zero) equals its fused kernel, the padded border included."""
    conv = nn.Conv2d(4, 4, (3, 5), padding=padding, bias=False, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    for kept in ("avg", "pointwise_kxk"):
        block = DBBlock.from_conv(conv, init="scratch")
        randomize_bn(block)
        with torch.no_grad():
            conv.weight.zero_()
            for name, branch in block.branches.items():
                if name not in (kept, "square"):
                    branch.bn.weight.zero_()
                    branch.bn.bias.zero_()
        block.eval()
        branch = block.branches[kept]
        with torch.no_grad():
            want = block(x)
            assert relative_error(want, conv_as(block, x, *block.fused_kernel())) <= 1e-10  # relative, float64
            zero_padded = branch.bn(branch.second(padded(block, branch.first_bn(branch.first(x)))))
        if padding != 0:  # zero padding the 1x1 output instead would be off by far more than rounding
            assert relative_error(want, zero_padded) > 1e-3


def test_scratch_init_sets_every_last_gamma():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6)
    block = DBBlock.from_conv(conv, bn, init="scratch", gamma_init=0.25)
    assert set(block.branches) == {"square", "pointwise", "avg", "pointwise_kxk"}
    assert block.branches["square"].bn is bn
    for name, branch in block.branches.items():
        assert torch.equal(branch.bn.weight, torch.full((6,), 0.25)), name
    fast = FastDBBlock.from_conv(nn.Conv2d(4, 6, 3, padding=1), init="scratch", gamma_init=0.25)
    for name in ("scale_1x1", "scale_avg", "scale_kxk"):
        assert torch.equal(getattr(fast, name), torch.full((6,), 0.25)), name
    assert torch.equal(fast.scale_square, torch.ones(6))


def test_preserve_init_zeroes_the_last_bn_of_every_new_branch():
    block = DBBlock.from_conv(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    for name in ("pointwise", "avg", "pointwise_kxk"):
        bn = block.branches[name].bn
        assert not bn.weight.any() and not bn.bias.any(), name
    assert block.branches["avg"].first_bn.weight.eq(1).all()


def test_inner_1x1_starts_as_the_identity_and_is_twice_as_wide_for_depthwise():
    branch = DBBlock.from_conv(nn.Conv2d(4, 6, 3, groups=2)).branches["pointwise_kxk"]
    assert torch.equal(branch.first.weight[:, :, 0, 0], torch.eye(2).repeat(2, 1))
    assert branch.second.weight.shape == (6, 2, 3, 3)
    depthwise = DBBlock.from_conv(nn.Conv2d(4, 4, 3, groups=4))
    assert set(depthwise.branches) == {"square", "avg", "pointwise_kxk"} and depthwise.branches["avg"].first is None
    inner = depthwise.branches["pointwise_kxk"].first.weight
    assert inner.shape == (8, 1, 1, 1) and inner.eq(1).all()
    fast = FastDBBlock.from_conv(nn.Conv2d(4, 4, 3, groups=4))
    assert fast.weight_1x1 is None and fast.scale_1x1 is None and fast.weight_inner.shape == (8, 1, 1, 1)


def test_describe():
    assert DBBlock.describe(nn.Conv2d(4, 4, 3)) == "3x3 + 1x1 + 1x1-avg + 1x1-3x3"
    assert DBBlock.describe(nn.Conv2d(4, 4, (3, 5), groups=4)) == "3x5 + avg + 1x1-3x5"
    assert FastDBBlock.describe(nn.Conv2d(4, 8, 5)) == "5x5 + 1x1 + 1x1-avg + 1x1-5x5 (composed)"


@pytest.mark.parametrize("cls", [DBBlock, FastDBBlock])
def test_gradients_reach_every_branch(cls):
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=2, groups=2, bias=True, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    assert_gradients_reach_every_kernel_and_scale(block, torch.randn(2, 4, 7, 7, dtype=torch.float64))


def test_preserve_init_lets_gradients_reach_the_new_gammas():
    block = DBBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64))
    grads = grads_after_backward(block, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    for name in ("pointwise", "avg", "pointwise_kxk"):
        assert grads[f"branches.{name}.bn.weight"].abs().sum() > 0, name


def test_equivalent_kernel_is_differentiable_and_in_the_block_dtype():
    block = DBBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), init="scratch")
    weight, bias = block.equivalent_kernel()
    assert weight.dtype == torch.float32 and block.fused_kernel()[0].dtype == torch.float64
    (weight.sum() + bias.sum()).backward()
    for name in ("avg", "pointwise_kxk"):
        assert block.branches[name].first.weight.grad.abs().sum() > 0, name
        assert block.branches[name].first_bn.bias.grad.abs().sum() > 0, name


class DoublingConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
        (nn.Conv2d(4, 4, 1), "1x1"),
        (nn.Conv2d(4, 4, (5, 4)), "even"),
        (nn.Conv3d(4, 4, 3), "Conv3d"),
        (DoublingConv(4, 4, 3), "DoublingConv overrides forward"),
    ],
)
def test_conv_problem_names_the_reason(conv, reason):
    for cls in (DBBlock, FastDBBlock):
        assert reason in cls.conv_problem(conv)
        with pytest.raises(ACNetError, match="another block kind"):
            cls.from_conv(conv)
    assert DBBlock.conv_problem(nn.Conv2d(4, 4, (1, 3), padding_mode="circular")) == ""


def test_registered_under_dbb_in_both_modes():
    assert block_class("dbb") is DBBlock and block_class("dbb", "fast") is FastDBBlock


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_acify_and_deploy_a_small_model_with_a_dilated_conv_falling_back_to_acb(mode):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    ).double()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    acified = acify(model, block="dbb", mode=mode, init="scratch")
    assert [s.kind for s in acified.acnet_plan.converted] == ["dbb", "dbb", "acb"]
    randomize_bn(acified)
    acified.eval()
    deployed = deploy(acified)
    assert not any(isinstance(m, (DBBlock, FastDBBlock)) for m in deployed.modules())
    with torch.no_grad():
        assert relative_error(acified(x), deployed(x)) <= 1e-10  # relative, float64


@pytest.mark.parametrize("cls", [DBBlock, FastDBBlock])
@pytest.mark.parametrize("groups, padding, padding_mode", [(1, (1, 2), "zeros"), (4, 3, "zeros"), (2, 2, "replicate")])
def test_symbolic_tracing_records_the_same_function(cls, groups, padding, padding_mode):
    conv = nn.Conv2d(4, 4, (3, 5), padding=padding, groups=groups, padding_mode=padding_mode, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(block(x), torch.fx.symbolic_trace(block)(x)) <= 1e-12  # relative, float64


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (1, (1, 2))])
def test_average_pool_equals_avg_pool2d_forward_and_backward(stride, padding):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    grads = []
    for pool in (average_pool, F.avg_pool2d):
        out = pool(x, (3, 5), (stride, stride), padding if isinstance(padding, tuple) else (padding, padding))
        (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), x)
        grads.append((out.detach(), grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_average_pool_keeps_the_input_dtype_under_cpu_autocast():
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert average_pool(x, (3, 3), (1, 1), (1, 1)).dtype == F.avg_pool2d(x, 3, 1, 1).dtype == torch.float32
