"""ACBlock geometry and fusion over the whole Conv2d option space."""

import pytest
import torch
from testkit import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet_convert import ACBlock, ACNetError, acify, deploy

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw):
    kh, kw = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([3, 5]))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    if padding_kind == "int":
        padding = draw(st.integers(0, 4))
    elif padding_kind == "tuple":
        padding = (draw(st.integers(0, 5)), draw(st.integers(0, 3)))
    else:
        padding = padding_kind
    groups = draw(st.sampled_from([1, 2, "depthwise"]))
    cin = draw(st.sampled_from([2, 4])) if groups != "depthwise" else 4
    cout = draw(st.sampled_from([2, 4])) if groups != "depthwise" else 4
    groups = cin if groups == "depthwise" else groups
    extent = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    size = (extent[0] + draw(st.integers(0, 5)), extent[1] + draw(st.integers(0, 5)))
    return dict(
        in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(PADDING_MODES)),
        with_bn=draw(st.booleans()), size=size,
    )  # fmt: skip


def _model(cfg, dtype):
    cfg = dict(cfg)
    with_bn, size = cfg.pop("with_bn"), cfg.pop("size")
    conv = nn.Conv2d(**cfg, dtype=dtype)
    layers = [conv, nn.BatchNorm2d(cfg["out_channels"], eps=1e-3, momentum=0.3, dtype=dtype)] if with_bn else [conv]
    return nn.Sequential(*layers), torch.randn(3, cfg["in_channels"], *size, dtype=dtype)


def _padding_fits(cfg):
    """Reflect/circular padding must be smaller than the input, as nn.Conv2d itself requires."""
    pad = cfg["padding"]
    if isinstance(pad, str) or cfg["padding_mode"] in ("zeros", "replicate"):
        return True
    pad = (pad, pad) if isinstance(pad, int) else pad
    return all(p < s for p, s in zip(pad, cfg["size"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=300, deadline=None, derandomize=True)
@given(cfg=conv_configs())
def test_deploy_equals_acified_eval_output(cfg, dtype):
    if not _padding_fits(cfg):
        cfg["padding_mode"] = "zeros"
    model, x = _model(cfg, dtype)
    acified = acify(model, init="scratch")
    assert acified.acnet_plan.converted[0].bn == ("1" if cfg["with_bn"] else None)
    randomize_bn(acified, x)
    acified.eval()
    deployed = deploy(acified)
    with torch.no_grad():
        want, got = acified(x), deployed(x)
    assert isinstance(deployed[0], nn.Conv2d) and deployed[0].bias is not None
    bound = (1e-5 if dtype == torch.float32 else 1e-10) * max(1.0, want.abs().max().item())  # relative bound
    assert (want - got).abs().max().item() <= bound


def test_block_output_shape_matches_the_conv_it_replaces_for_every_padding_form():
    for padding in [0, 1, 3, (0, 4), "same", "valid"]:
        conv = nn.Conv2d(3, 5, (5, 3), padding=padding, dilation=(2, 1))
        x = torch.randn(2, 3, 13, 11)
        assert ACBlock.from_conv(conv)(x).shape == conv(x).shape


def test_preserve_init_keeps_the_function_and_scratch_changes_it():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, eps=1e-3, momentum=0.05)
    ref = nn.Sequential(conv, bn).eval()
    randomize_bn(ref, torch.randn(4, 4, 8, 8))
    ref.eval()
    x = torch.randn(2, 4, 8, 8)
    want = ref(x)
    preserved = ACBlock.from_conv(conv, bn, init="preserve").eval()
    torch.testing.assert_close(preserved(x), want, rtol=1e-5, atol=1e-6)
    scratch = ACBlock.from_conv(conv, bn, init="scratch", gamma_init=0.5).eval()
    assert not torch.allclose(scratch(x), want)
    for name in ("hor", "ver"):
        new_bn = preserved.branches[name].bn
        assert (new_bn.eps, new_bn.momentum) == (1e-3, 0.05)
        assert torch.all(scratch.branches[name].bn.weight == 0.5)


def test_fuse_keeps_dtype_device_and_folds_conv_bias():
    block = ACBlock(3, 4, 3, padding=1, bias=True, dtype=torch.float64)
    with torch.no_grad():
        block.branches["square"].conv.bias.fill_(2.0)
    fused = block.eval().fuse()
    assert fused.weight.dtype == torch.float64 and fused.bias is not None
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), block(x), rtol=0, atol=1e-12)


def test_square_bn_is_optional_in_the_constructor():
    block = ACBlock(3, 4, 3, padding=1, square_bn=False)
    assert isinstance(block.branches["square"].bn, nn.Identity)
    assert isinstance(block.branches["hor"].bn, nn.BatchNorm2d)


@pytest.mark.parametrize("kernel", [(2, 2), (1, 3), (3, 4)])
def test_block_refuses_kernels_without_a_centre_line(kernel):
    with pytest.raises(ACNetError, match="odd kernel sides"):
        ACBlock(3, 4, kernel)


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ACNetError, match="unknown init 'zero'"):
        ACBlock.from_conv(nn.Conv2d(1, 1, 3), init="zero")
