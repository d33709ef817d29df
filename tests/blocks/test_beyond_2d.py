"""Asymmetric blocks for Conv3d and ConvTranspose2d: the option grid, torchvision video models, a U-Net decoder."""

import pytest
import torch
from testkit import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from roundtrip import check_round_trip, output_sum
from torch import nn
from torchvision.models import video

from acnet_convert import ACBlock, acify, deploy, plan, verify

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # max abs error / max(1, max |y|)


def assert_exact(model, x, dtype, **options):
    """acify (scratch init), give every BN real statistics, deploy, and compare eval outputs."""
    acified = acify(model, init="scratch", **options)
    assert len(acified.acnet_plan.converted) == 1
    randomize_bn(acified, x)
    acified.eval()
    deployed = deploy(acified)
    assert not any(isinstance(m, ACBlock) for m in deployed.modules())
    with torch.no_grad():
        want, got = acified(x), deployed(x)
    assert want.shape == got.shape
    assert (want - got).abs().max().item() <= TOLERANCE[dtype] * max(1.0, want.abs().max().item())


@st.composite
def conv3d_configs(draw):
    kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(3))
    if sum(k >= 3 for k in kernel) < 2:
        kernel = (3, 3, kernel[2])
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    padding = {"int": draw(st.integers(0, 3)), "tuple": tuple(draw(st.integers(0, 3)) for _ in range(3))}.get(
        padding, padding
    )
    groups = draw(st.sampled_from([1, 2]))
    size = tuple(d * (k - 1) + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation))
    mode = draw(st.sampled_from(["zeros", "replicate", "circular", "reflect"]))
    pads = (padding,) * 3 if isinstance(padding, int) else padding
    if mode in ("reflect", "circular") and not isinstance(pads, str) and any(p >= s for p, s in zip(pads, size)):
        mode = "zeros"
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), padding_mode=mode), size, draw(st.booleans())  # fmt: skip


@pytest.mark.parametrize("layout", ["lines", "planes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=conv3d_configs())
def test_conv3d_blocks_deploy_exactly(case, dtype, layout):
    options, size, with_bn = case
    layers = [nn.Conv3d(2, 4, **options, dtype=dtype)] + ([nn.BatchNorm3d(4, dtype=dtype)] if with_bn else [])
    assert_exact(nn.Sequential(*layers), torch.randn(2, 2, *size, dtype=dtype), dtype, layout3d=layout)


@st.composite
def transposed_configs(draw):
    kernel = (draw(st.sampled_from([3, 5])), draw(st.sampled_from([3, 5, 7])))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    groups = draw(st.sampled_from([1, 2, 4]))
    return dict(kernel_size=kernel, stride=stride, padding=padding, output_padding=output_padding,
                dilation=dilation, groups=groups, bias=draw(st.booleans())), draw(st.booleans())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=transposed_configs())
def test_transposed_blocks_deploy_exactly(case, dtype):
    options, with_bn = case
    size = (5, 6)
    # Keep the output non-empty, as nn.ConvTranspose2d itself requires: 2p <= (n-1)s + d(k-1) + output_padding.
    options["padding"] = tuple(
        min(p, ((n - 1) * s + d * (k - 1) + op) // 2)
        for p, n, s, d, k, op in zip(options["padding"], size, options["stride"], options["dilation"],
                                     options["kernel_size"], options["output_padding"])
    )  # fmt: skip
    layers = [nn.ConvTranspose2d(4, 8, **options, dtype=dtype)] + ([nn.BatchNorm2d(8, dtype=dtype)] if with_bn else [])
    assert_exact(nn.Sequential(*layers), torch.randn(2, 4, *size, dtype=dtype), dtype)


def test_3d_branch_layouts_and_report():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 4, (1, 3, 3)), nn.Conv3d(4, 4, (3, 1, 1)))
    lines = {s.name: s for s in plan(model).sites}
    assert lines["0"].branches == "3x3x3 + 3x1x1 + 1x3x1 + 1x1x3" and lines["0"].bn == "1"
    assert lines["2"].branches == "1x3x3 + 1x3x1 + 1x1x3", "sides of 1 get no line"
    assert lines["3"].action == "skip" and "at least two kernel sides" in lines["3"].reason
    planes = {s.name: s for s in plan(model, layout3d="planes").sites}
    assert planes["0"].branches == "3x3x3 + 1x3x3 + 3x1x3 + 3x3x1"
    assert planes["2"].branches == lines["2"].branches, "planes need every side >= 3; others keep lines"
    block = acify(model, layout3d="planes")[0]
    assert set(block.branches) == {"square", "plane_hw", "plane_dw", "plane_dh"}
    assert isinstance(block.branches["plane_hw"].bn, nn.BatchNorm3d)
    assert "Conv3d" in str(plan(model))


class UNetDecoder(nn.Module):
    """Two upsampling stages (ConvTranspose2d + BN + ReLU) with skip connections, then a 3x3 head."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(8))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(16, 4, 5, stride=2, padding=2, output_padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, bottom, skip1, skip2):
        x = torch.relu(self.up1(bottom))
        x = torch.relu(self.up2(torch.cat([x, skip1], 1)))
        return self.head(torch.cat([x, skip2], 1))


def test_unet_decoder_with_transposed_convs_round_trips_exactly():
    inputs = (torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8), torch.randn(2, 4, 16, 16))
    model = UNetDecoder()
    acified = acify(model, init="scratch")
    assert [s.bn for s in acified.acnet_plan.converted] == ["up1.1", "up2.1", None]
    randomize_bn(acified, *inputs)
    deployed = deploy(acified)
    assert isinstance(deployed.up1[0], nn.ConvTranspose2d) and isinstance(deployed.up1[1], nn.Identity)
    verify(acified, deployed, *inputs, rtol=1e-5)  # float32


def test_transposed_conv_called_with_output_size_is_skipped():
    class WithOutputSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=[x.shape[2] * 2, x.shape[3] * 2])

    site = plan(WithOutputSize()).sites[0]
    assert site.action == "skip" and "extra arguments" in site.reason


def test_fast_mode_leaves_3d_convs_alone_and_says_so():
    model = nn.Sequential(nn.Conv3d(2, 4, 3))
    acified = acify(model, mode="fast")
    assert isinstance(acified[0], nn.Conv3d)
    assert acified.acnet_plan.sites[0].reason == "fast mode converts Conv2d only"


VIDEO = {"r3d_18": (2, 8, 32), "mc3_18": (2, 8, 32), "r2plus1d_18": (2, 8, 32), "s3d": (1, 16, 224)}


@pytest.mark.parametrize("name", sorted(VIDEO))
def test_torchvision_video_model(name):
    batch, frames, size = VIDEO[name]
    x = torch.randn(batch, 3, frames, size, size)
    model = getattr(video, name)(weights=None)
    check_round_trip(model, lambda m: output_sum(m(x)), (x,))
