"""The Dilated Reparam Block (kind "dilated"): fusion over large depthwise kernels, strides and paddings, the branch
table, the fallback of other convs, preserve init, a small model end to end."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reparam_cases import (
    PADDING_MODES,
    assert_gradients_reach_every_kernel_and_scale,
    check_exact_fusion,
    check_preserve,
    conv_and_input,
    conv_as,
    padded,
    randomize_bn,
    randomize_scales,
    relative_error,
)  # fmt: skip
from roundtrip import calibrate_bn, n_params
from torch import nn

from acnet_convert import acify, deploy, quant_report
from acnet_convert.blocks.dilated import PAPER_BRANCHES, DilatedBlock, FastDilatedBlock, dilated_branches
from acnet_convert.kernels import dilate_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def dilated_configs(draw):
    """Depthwise convs with odd K from 5 to 15: padding 'same', 'valid', K//2, below it or above it; stride 1 or 2."""
    size = draw(st.sampled_from([5, 7, 9, 11, 13, 15]))
    padding_kind = draw(st.sampled_from(["same", "valid", "half", "below", "above", "tuple"]))
    padding = {"same": "same", "valid": "valid", "half": size // 2, "below": draw(st.integers(0, size // 2 - 1)),
               "above": size // 2 + draw(st.integers(1, 2)),
               "tuple": (draw(st.integers(0, size // 2)), draw(st.integers(0, size // 2)))}[padding_kind]  # fmt: skip
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1)]))
    channels = draw(st.sampled_from([1, 2, 4]))
    side = size + draw(st.integers(0, 4))
    mode = draw(st.sampled_from(PADDING_MODES))
    pad = (0, 0) if isinstance(padding, str) else (padding, padding) if isinstance(padding, int) else padding
    if mode != "zeros" and max(pad) >= side:  # as nn.Conv2d itself requires
        mode = "zeros"
    return dict(
        in_channels=channels, out_channels=channels, kernel_size=size, stride=stride, padding=padding, dilation=1,
        groups=channels, bias=draw(st.booleans()), padding_mode=mode, with_bn=draw(st.booleans()), size=(side, side),
    )  # fmt: skip


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=dilated_configs())
def test_exact_block_equals_its_fused_conv(cfg):
    err64, err32 = check_exact_fusion(DilatedBlock, cfg)
    assert err64 <= 1e-10  # relative, float64
    assert err32 <= 1e-5  # relative, float32


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cfg=dilated_configs())
def test_fast_composed_kernel_equals_the_sum_of_its_branches(cfg):
    conv, _, x = conv_and_input(cfg)
    block = FastDilatedBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    weight, bias = block.equivalent_kernel()
    with torch.no_grad():
        got = conv_as(block, x, weight, bias)
        assert relative_error(got, block(x)) <= 1e-12  # relative: forward runs that very conv
        assert relative_error(got, block.fuse()(x)) <= 1e-12  # relative: fuse() holds that kernel
        want = _fast_branches(block, x)
    assert relative_error(want, got) <= 1e-10  # relative, float64


def _fast_branches(block: FastDilatedBlock, x: torch.Tensor) -> torch.Tensor:
    """The fast block's branches run one by one on the padded input, each dilated conv reading the window of the
    large kernel it is centred in."""
    xp, size, channels = padded(block, x), block.kernel_size[0], block.out_channels
    out = F.conv2d(xp, block.weight, None, block.stride, groups=channels) * block.scale_square.reshape(-1, 1, 1)
    if block.bias is not None:
        out = out + block.bias.reshape(-1, 1, 1)
    for k, d in dilated_branches(size):
        offset = (size - d * (k - 1) - 1) // 2
        window = xp[..., offset : xp.shape[-2] - offset, offset : xp.shape[-1] - offset]
        small = F.conv2d(window, getattr(block, f"weight_k{k}d{d}"), None, block.stride, dilation=d, groups=channels)
        out = out + small * getattr(block, f"scale_k{k}d{d}").reshape(-1, 1, 1)
    return out


@pytest.mark.parametrize("cls", [DilatedBlock, FastDilatedBlock])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(cfg=dilated_configs())
def test_preserve_init_computes_what_the_conv_and_bn_did(cls, cfg):
    assert check_preserve(cls, cfg) <= 1e-6  # relative, float64


@pytest.mark.parametrize("cls", [DilatedBlock, FastDilatedBlock])
def test_gradients_reach_every_branch_and_tracing_records_the_same_function(cls):
    conv = nn.Conv2d(4, 4, 9, padding=(2, 5), padding_mode="reflect", groups=4, bias=True, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    assert_gradients_reach_every_kernel_and_scale(block, x)
    randomize_bn(block)
    block.eval()
    with torch.no_grad():
        assert relative_error(block(x), torch.fx.symbolic_trace(block)(x)) <= 1e-12  # relative, float64


@pytest.mark.parametrize("size", [5, 7, 9, 11, 13, 15, 31])
def test_every_branch_is_a_smaller_odd_kernel_whose_dilated_extent_fits(size):
    branches = dilated_branches(size)
    assert branches == PAPER_BRANCHES.get(size, PAPER_BRANCHES[13])
    for k, d in branches:
        assert k % 2 == 1 and 1 < k < size and d * (k - 1) + 1 <= size
    block = DilatedBlock.from_conv(nn.Conv2d(2, 2, size, padding=size // 2, groups=2))
    assert len(block.branches) == len(branches) + 1
    assert block.describe(block) == " + ".join([f"{size}x{size}", *(f"{k}x{k} d{d}" for k, d in branches)])


@pytest.mark.parametrize("side, dilation", [(3, 2), (5, 3), (3, 1)])
def test_dilate_kernel_is_the_kernel_a_dilated_conv_applies(side, dilation):
    weight = torch.randn(3, 1, side, side, dtype=torch.float64)
    x = torch.randn(2, 3, 17, 17, dtype=torch.float64)
    dense = dilate_kernel(weight, (dilation, dilation))
    assert dense.shape[-1] == dilation * (side - 1) + 1
    want = F.conv2d(x, weight, dilation=dilation, groups=3)
    assert (want - F.conv2d(x, dense, groups=3)).abs().max().item() <= 1e-12  # float64


def test_preserve_starts_the_new_branches_at_zero_and_scratch_at_gamma():
    conv, bn = nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.BatchNorm2d(4)
    block = DilatedBlock.from_conv(conv, bn)
    assert block.branches["square"].conv is conv and block.branches["square"].bn is bn
    for name, branch in block.branches.items():
        if name != "square":
            assert not branch.bn.weight.any() and not branch.bn.bias.any(), name
    scratch = DilatedBlock.from_conv(nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.BatchNorm2d(4), init="scratch",
                                     gamma_init=0.25)  # fmt: skip
    assert all(torch.equal(b.bn.weight, torch.full((4,), 0.25)) for b in scratch.branches.values())


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 7, padding=3), "not a depthwise conv"),
        (nn.Conv2d(4, 8, 7, padding=3, groups=4), "not a depthwise conv"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), "kernel 3x3"),
        (nn.Conv2d(4, 4, 6, groups=4), "kernel 6x6"),
        (nn.Conv2d(4, 4, (7, 5), groups=4), "kernel 7x5"),
        (nn.Conv2d(4, 4, 7, dilation=2, groups=4), "dilation > 1"),
        (nn.Conv3d(4, 4, 7, groups=4), "Conv3d"),
    ],
)
def test_conv_problem_names_the_reason(conv, reason):
    assert reason in DilatedBlock.conv_problem(conv)


class LargeKernels(nn.Module):
    """A stem, a 7x7 and a 13x13 depthwise conv (the second strided, padded below K//2), each followed by a
    BatchNorm, and a 1x1 head conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw7, self.bn7 = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False), nn.BatchNorm2d(8)
        self.dw13, self.bn13 = nn.Conv2d(8, 8, 13, stride=2, padding=4, groups=8, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.bn7(self.dw7(x)))
        return self.head(torch.relu(self.bn13(self.dw13(x))))


def test_a_model_with_7x7_and_13x13_depthwise_convs_converts_exactly_and_the_rest_falls_back():
    torch.manual_seed(0)
    model = LargeKernels().double().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    acified = acify(model, block="dilated")
    with torch.no_grad():
        assert relative_error(want, acified(x)) <= 1e-5  # preserve init: the new branches add exact zeros
    sites = {s.name: s for s in acified.acnet_plan.sites}
    assert {n: (s.action, s.kind) for n, s in sites.items()} == {
        "stem": ("convert", "acb"), "dw7": ("convert", "dilated"), "dw13": ("convert", "dilated"),
        "head": ("skip", None)}  # fmt: skip
    assert sites["stem"].codes == ["kind-unsupported", "fallback-kind"] and "not a depthwise conv" in sites["stem"].reason
    assert sites["head"].codes == ["kind-unsupported"] and "not a depthwise conv" in sites["head"].reason
    acified.train()
    acified(x).sum().backward()
    for name in ("dw7", "dw13"):  # preserve init: each new branch is reached through its BatchNorm's gamma
        branches = getattr(acified, name).branches
        assert all(b.conv.weight.grad is not None and b.bn.weight.grad.abs().sum() > 0 for b in branches.values())
    calibrate_bn(acified, (x,))
    deployed = deploy(acified)
    with torch.no_grad():
        assert relative_error(acified(x), deployed(x)) <= 1e-8  # relative, float64
    absorbed = sum(p.numel() for bn in (model.stem_bn, model.bn7, model.bn13) for p in bn.parameters())
    assert n_params(deployed) == n_params(model) - absorbed + 8 + 8  # biases added to dw7 and dw13
    assert len(quant_report(deployed).layers) == 4  # the deployed convs, as the quantisation report sees them
