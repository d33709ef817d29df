"""The RepVGG block (kind "repvgg"), exact and fast: fusion over the Conv2d option space, init, gradients, problems."""

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
    padded,
    randomize_bn,
    randomize_scales,
    relative_error,
)  # fmt: skip
from torch import nn

from acnet_convert import ACNetError, acify, deploy
from acnet_convert.blocks.registry import block_class
from acnet_convert.blocks.repvgg import FastRepVGGBlock, RepVGGBlock

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_exact_block_equals_its_fused_conv(cfg):
    err64, err32 = check_exact_fusion(RepVGGBlock, cfg)
    assert err64 <= 1e-10  # relative, float64
    assert err32 <= 1e-5  # relative, float32


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_fast_composed_kernel_equals_the_sum_of_its_branches(cfg):
    conv, _, x = conv_and_input(cfg)
    block = FastRepVGGBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    weight, bias = block.equivalent_kernel()
    with torch.no_grad():
        got = conv_as(block, x, weight, bias)
        assert relative_error(got, block(x)) <= 1e-12  # relative: forward runs that very conv
        assert relative_error(got, block.fuse()(x)) <= 1e-12  # relative: fuse() holds that kernel
        want = _fast_branches(block, x)
    assert relative_error(want, got) <= 1e-10  # relative, float64


def _fast_branches(block: FastRepVGGBlock, x: torch.Tensor) -> torch.Tensor:
    """The fast block's branches run one by one on the padded input: KxK conv, 1x1 conv and identity at its centre."""
    xp = padded(block, x)
    (kh, kw), (dh, dw), (sh, sw) = block.kernel_size, block.dilation, block.stride
    square = F.conv2d(xp, block.weight, None, block.stride, 0, block.dilation, block.groups)
    out = _scaled_out(square, block.scale_square)
    if block.bias is not None:
        out = out + block.bias.reshape(1, -1, 1, 1)
    h, w = out.shape[-2:]
    centre = xp[..., dh * (kh // 2) :: sh, dw * (kw // 2) :: sw][..., :h, :w]
    out = out + _scaled_out(F.conv2d(centre, block.weight_1x1, groups=block.groups), block.scale_1x1)
    if block.scale_identity is not None:
        out = out + _scaled_out(centre, block.scale_identity)
    return out


def _scaled_out(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return y * scale.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [RepVGGBlock, FastRepVGGBlock])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_preserve_init_computes_what_the_conv_and_bn_did(cls, cfg):
    assert check_preserve(cls, cfg) <= 1e-6  # relative, float64


def test_scratch_init_sets_every_gamma():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    block = RepVGGBlock.from_conv(conv, bn, init="scratch", gamma_init=0.25)
    assert block.branches["square"].bn is bn
    for name in ("square", "pointwise", "identity"):
        assert torch.equal(block.branches[name].bn.weight, torch.full((4,), 0.25)), name
    fast = FastRepVGGBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1), init="scratch", gamma_init=0.25)
    assert torch.equal(fast.scale_1x1, torch.full((4,), 0.25)) and torch.equal(fast.scale_identity, fast.scale_1x1)
    assert torch.equal(fast.scale_square, torch.ones(4))


def test_from_conv_keeps_the_conv_weight_and_the_bn_objects():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
    block = RepVGGBlock.from_conv(conv, bn)
    assert block.branches["square"].conv.weight is conv.weight and block.branches["square"].bn is bn
    fast = FastRepVGGBlock.from_conv(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias


def test_identity_branch_only_with_equal_channels_and_stride_1():
    assert set(RepVGGBlock.from_conv(nn.Conv2d(4, 4, 3)).branches) == {"square", "pointwise", "identity"}
    assert set(RepVGGBlock.from_conv(nn.Conv2d(4, 4, 3, stride=2)).branches) == {"square", "pointwise"}
    assert set(RepVGGBlock.from_conv(nn.Conv2d(4, 8, 3)).branches) == {"square", "pointwise"}
    assert FastRepVGGBlock.from_conv(nn.Conv2d(4, 8, 3)).scale_identity is None
    assert RepVGGBlock.describe(nn.Conv2d(4, 4, (3, 5))) == "3x5 + 1x1 + identity"
    assert RepVGGBlock.describe(nn.Conv2d(4, 8, 3)) == "3x3 + 1x1"


@pytest.mark.parametrize("cls", [RepVGGBlock, FastRepVGGBlock])
def test_gradients_reach_every_branch(cls):
    conv = nn.Conv2d(4, 4, 3, padding=2, groups=2, bias=True, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    assert_gradients_reach_every_kernel_and_scale(block, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_equivalent_kernel_is_differentiable_and_in_the_block_dtype():
    block = RepVGGBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), init="scratch")
    weight, bias = block.equivalent_kernel()
    assert weight.dtype == torch.float32 and block.fused_kernel()[0].dtype == torch.float64
    (weight.sum() + bias.sum()).backward()
    assert block.branches["identity"].bn.weight.grad is not None
    assert block.branches["pointwise"].conv.weight.grad is not None


class DoublingConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 1), "1x1"),
        (nn.Conv2d(4, 4, (3, 2)), "even"),
        (nn.Conv3d(4, 4, 3), "Conv3d"),
        (nn.ConvTranspose2d(4, 4, 3), "ConvTranspose2d"),
        (DoublingConv(4, 4, 3), "DoublingConv overrides forward"),
    ],
)
def test_conv_problem_names_the_reason(conv, reason):
    for cls in (RepVGGBlock, FastRepVGGBlock):
        assert reason in cls.conv_problem(conv)
        with pytest.raises(ACNetError, match="another block kind"):
            cls.from_conv(conv)
    assert RepVGGBlock.conv_problem(nn.Conv2d(4, 4, 3, dilation=2, padding_mode="reflect")) == ""


def test_registered_under_repvgg_in_both_modes_and_unknown_init_is_refused():
    assert block_class("repvgg") is RepVGGBlock and block_class("repvgg", "fast") is FastRepVGGBlock
    with pytest.raises(ACNetError, match="unknown init"):
        RepVGGBlock.from_conv(nn.Conv2d(4, 4, 3), init="zeros")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_acify_and_deploy_a_small_model(mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model = model.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    acified = acify(model, block="repvgg", mode=mode, init="scratch")
    assert all(s.kind == "repvgg" for s in acified.acnet_plan.converted) and len(acified.acnet_plan.converted) == 2
    randomize_bn(acified)
    acified.eval()
    deployed = deploy(acified)
    assert not any(isinstance(m, (RepVGGBlock, FastRepVGGBlock)) for m in deployed.modules())
    with torch.no_grad():
        assert relative_error(acified(x), deployed(x)) <= 1e-10  # relative, float64


@pytest.mark.parametrize("cls", [RepVGGBlock, FastRepVGGBlock])
@pytest.mark.parametrize("padding, padding_mode", [((1, 2), "zeros"), (3, "zeros"), (2, "reflect")])
def test_symbolic_tracing_records_the_same_function(cls, padding, padding_mode):
    conv = nn.Conv2d(4, 4, (3, 5), padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(block(x), torch.fx.symbolic_trace(block)(x)) <= 1e-12  # relative, float64
