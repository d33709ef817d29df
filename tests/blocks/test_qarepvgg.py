"""The quantization-friendly RepVGG block (kind "qarepvgg"): fusion over the Conv2d option space, init, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from reparam_cases import (
    assert_gradients_reach_every_kernel_and_scale,
    check_exact_fusion,
    check_preserve,
    conv_configs,
    randomize_bn,
    relative_error,
)  # fmt: skip
from torch import nn

from acnet_convert import ACNetError, acify, deploy
from acnet_convert.blocks.qarepvgg import QARepVGGBlock
from acnet_convert.blocks.registry import block_class

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_block_equals_its_fused_conv(cfg):
    err64, err32 = check_exact_fusion(QARepVGGBlock, cfg)
    assert err64 <= 1e-10  # relative, float64
    assert err32 <= 1e-5  # relative, float32


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_preserve_init_computes_what_the_conv_and_bn_did(cfg):
    assert check_preserve(QARepVGGBlock, cfg) <= 1e-6  # relative, float64


def test_batchnorms_sit_on_the_kxk_branch_and_after_the_sum_only():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    block = QARepVGGBlock.from_conv(conv, bn)
    assert block.post_bn is bn and isinstance(block.branches["square"].bn, nn.BatchNorm2d)
    assert block.branches["square"].bn is not bn and block.branches["square"].conv is conv
    assert isinstance(block.branches["pointwise"].bn, nn.Identity)
    assert isinstance(block.branches["identity"].bn, nn.Identity)
    assert isinstance(QARepVGGBlock.from_conv(conv).post_bn, nn.Identity)
    assert QARepVGGBlock.describe(conv) == "(3x3 + 1x1 + identity)-BN"


def test_preserve_init_cancels_the_identity_with_the_1x1():
    block = QARepVGGBlock.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    assert torch.equal(block.branches["pointwise"].conv.weight[:, :, 0, 0], -torch.eye(2).repeat(2, 1))
    assert torch.allclose(block.branches["square"].bn.weight, torch.full((4,), math.sqrt(1 + 1e-5)))
    no_identity = QARepVGGBlock.from_conv(nn.Conv2d(4, 8, 3))
    assert "identity" not in no_identity.branches and not no_identity.branches["pointwise"].conv.weight.any()


def test_scratch_init_sets_both_gammas():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    block = QARepVGGBlock.from_conv(conv, bn, init="scratch", gamma_init=0.25)
    assert torch.equal(bn.weight, torch.full((4,), 0.25))
    assert torch.equal(block.branches["square"].bn.weight, torch.full((4,), 0.25))
    assert block.branches["pointwise"].conv.weight.abs().sum() > 0  # PyTorch's default initialisation


def test_gradients_reach_every_branch():
    conv = nn.Conv2d(4, 4, 3, padding=2, bias=True, dtype=torch.float64)
    block = QARepVGGBlock.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64))
    assert_gradients_reach_every_kernel_and_scale(block, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_exact_mode_only_and_the_same_problems_as_repvgg():
    assert block_class("qarepvgg") is QARepVGGBlock
    with pytest.raises(ACNetError, match="no fast mode"):
        block_class("qarepvgg", "fast")
    assert "1x1" in QARepVGGBlock.conv_problem(nn.Conv2d(4, 4, 1))
    with pytest.raises(ACNetError, match="another block kind"):
        QARepVGGBlock.from_conv(nn.Conv2d(4, 4, 2))


def test_acify_and_deploy_a_small_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).double()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    acified = acify(model, block="qarepvgg", init="scratch")
    assert [s.bn for s in acified.acnet_plan.converted] == ["1", "4"]
    randomize_bn(acified)
    acified.eval()
    deployed = deploy(acified)
    assert not any(isinstance(m, QARepVGGBlock) for m in deployed.modules())
    with torch.no_grad():
        assert relative_error(acified(x), deployed(x)) <= 1e-10  # relative, float64


@pytest.mark.parametrize("padding, padding_mode", [(1, "zeros"), (3, "zeros"), (2, "circular")])
def test_symbolic_tracing_records_the_same_function(padding, padding_mode):
    conv = nn.Conv2d(4, 4, 3, padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    block = QARepVGGBlock.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64), init="scratch")
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(block(x), torch.fx.symbolic_trace(block)(x)) <= 1e-12  # relative, float64
