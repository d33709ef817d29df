"""Conv configurations and checks shared by the tests of the DBB, RepVGG and QARepVGG blocks."""

import copy

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

PADDING_MODES = ["zeros", "zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw, dilation: bool = True):
    """Conv2d settings with odd kernel sides (not 1x1), any padding form, groups and padding mode; tiny sizes."""
    kh, kw = draw(st.sampled_from([(3, 3), (3, 5), (5, 3), (1, 3), (3, 1), (5, 5)]))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilation else (1, 1)
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if padding_kind == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if padding_kind == "int":
        padding = draw(st.integers(0, 4))
    elif padding_kind == "tuple":
        padding = (draw(st.integers(0, 4)), draw(st.integers(0, 3)))
    else:
        padding = padding_kind
    groups = draw(st.sampled_from([1, 2, "depthwise"]))
    if groups == "depthwise":
        cin = cout = groups = draw(st.sampled_from([2, 4]))
    else:
        cin, cout = draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([2, 4, 8]))
    if draw(st.booleans()):  # as often as not, in == out channels with stride 1: the identity branch exists
        cout, stride = cin, 1
    extent = (dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1)
    size = tuple(max(e + draw(st.integers(0, 3)), 5) for e in extent)
    pad = (0, 0) if isinstance(padding, str) else (padding, padding) if isinstance(padding, int) else padding
    mode = draw(st.sampled_from(PADDING_MODES))
    if mode != "zeros" and any(p >= s for p, s in zip(pad, size)):  # as nn.Conv2d itself requires
        mode = "zeros"
    return dict(
        in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dil,
        groups=groups, bias=draw(st.booleans()), padding_mode=mode, with_bn=draw(st.booleans()), size=size,
    )  # fmt: skip


def conv_and_input(cfg: dict, dtype=torch.float64):
    """The conv, the BatchNorm after it (randomised, or None) and an input batch for ``cfg``."""
    cfg = dict(cfg)
    with_bn, size = cfg.pop("with_bn"), cfg.pop("size")
    conv = nn.Conv2d(**cfg, dtype=dtype)
    bn = nn.BatchNorm2d(cfg["out_channels"], eps=1e-3, momentum=0.3, dtype=dtype) if with_bn else None
    if bn is not None:
        randomize_bn(bn)
    return conv, bn, torch.randn(2, cfg["in_channels"], *size, dtype=dtype)


def randomize_bn(module: nn.Module) -> None:
    """Random gamma, beta and running statistics for every BatchNorm in ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)


def randomize_scales(module: nn.Module) -> None:
    """Random values for every ``scale_*`` parameter of a fast block."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("scale_"):
                p.uniform_(0.5, 1.5)


def conv_as(block: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` through a conv with ``block``'s settings (padding mode included) holding ``weight`` and ``bias``."""
    return F.conv2d(padded(block, x), weight, bias, block.stride, 0, block.dilation, block.groups)


def padded(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded the way ``block``'s conv pads its input."""
    kh, kw = block.kernel_size
    if block.padding == "valid":
        ph = pw = 0
    elif block.padding == "same":
        ph, pw = block.dilation[0] * (kh - 1) // 2, block.dilation[1] * (kw - 1) // 2
    else:
        ph, pw = block.padding
    mode = "constant" if block.padding_mode == "zeros" else block.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode)


def relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    """Max absolute difference over the larger of 1 and the largest magnitude of ``want``."""
    return (want - got).abs().max().item() / max(1.0, want.abs().max().item())


def check_exact_fusion(cls, cfg: dict) -> tuple[float, float]:
    """Build ``cls`` around a random conv (scratch init, every BatchNorm random), return the float64 and float32
    relative errors of its fusion; also check the fused conv's class, settings and output shape."""
    conv, bn, x = conv_and_input(cfg)
    block = cls.from_conv(conv, bn, init="scratch")
    randomize_bn(block)
    block.eval()
    with torch.no_grad():
        want = block(x)
        assert want.shape == conv(x).shape
        weight, bias = block.fused_kernel()
        err64 = relative_error(want, conv_as(block, x, weight, bias))
        fused = copy.deepcopy(block).float().fuse()
        assert type(fused) is nn.Conv2d and fused.bias is not None and not fused.training
        assert (fused.padding, fused.padding_mode, fused.stride, fused.groups) == \
            (conv.padding, conv.padding_mode, conv.stride, conv.groups)  # fmt: skip
        x32 = x.float()
        err32 = relative_error(block.float()(x32), fused(x32))
    return err64, err32


def check_preserve(cls, cfg: dict) -> float:
    """Relative difference, eval mode, float64, between a block fresh from ``from_conv`` (preserve) and what it
    replaces: ``bn(conv(x))`` for a block that absorbs the BatchNorm, ``conv(x)`` otherwise."""
    conv, bn, x = conv_and_input(cfg)
    conv.eval()
    bn = bn.eval() if bn is not None and cls.absorbs_bn else None
    with torch.no_grad():
        want = conv(x) if bn is None else bn(conv(x))
    block = cls.from_conv(conv, bn)
    assert not block.training
    with torch.no_grad():
        return relative_error(want, block(x))


def grads_after_backward(block: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The gradient of every parameter of ``block`` after one backward of a weighted sum of its train-mode output."""
    block.train()
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    return {name: p.grad for name, p in block.named_parameters()}


def assert_gradients_reach_every_kernel_and_scale(block: nn.Module, x: torch.Tensor) -> None:
    """After a train-mode backward every parameter has a gradient, and every kernel, gamma and scale a non-zero one.

    (A bias right before a train-mode BatchNorm has a zero gradient by construction, so biases are not held to it.)
    """
    grads = grads_after_backward(block, x)
    for name, grad in grads.items():
        assert grad is not None, name
        if name.rsplit(".", 1)[-1].startswith(("weight", "scale")):
            assert grad.abs().sum().item() > 1e-6, name  # far above rounding noise
