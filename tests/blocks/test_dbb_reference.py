"""The exact DBB's forward against a straightforward implementation of the block: every branch computed as the
paper draws it (each BatchNorm on its own conv's output), in train and eval mode, float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reparam_cases import randomize_bn, relative_error
from torch import nn

from acnet_convert.blocks.branches import ConvBranch
from acnet_convert.blocks.dbb import ComposedBranch, DBBlock

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [  # in, out, kernel, stride, padding, groups, padding mode, BatchNorm momentum
    (4, 6, 3, 1, 1, 1, "zeros", 0.1),
    (4, 4, 3, 2, 1, 4, "zeros", 0.1),  # depthwise, stride 2
    (4, 8, (3, 5), 1, (2, 0), 2, "zeros", None),  # grouped; cumulative running averages
    (6, 6, 5, 2, 3, 3, "zeros", 0.3),  # padding beyond the kernel's half: cropped 1x1, explicitly padded pool
    (4, 4, 3, 1, 0, 1, "zeros", 0.1),
    (2, 4, 3, (1, 2), 4, 1, "zeros", 0.1),
    (4, 4, 3, 1, 1, 4, "reflect", 0.1),
    (4, 6, (5, 3), 1, "same", 2, "circular", 0.1),
]


def _pad(x: torch.Tensor, padding: tuple[int, int], mode: str, value: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` padded by ``padding``: with ``mode``, or with ``value`` per channel."""
    pads = (padding[1], padding[1], padding[0], padding[0])
    if value is None:
        return F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
    value = value.reshape(1, -1, 1, 1)
    return F.pad(x - value, pads) + value


def _zero_input_output(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What ``bn`` outputs for a zero input from its running statistics."""
    return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)


def reference(block: DBBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output, each branch as drawn: conv, BatchNorm, the 1x1 output padded as the fused conv sees it."""
    out = 0
    for branch in block.branches.values():
        if isinstance(branch, ConvBranch):
            ch, cw = branch.crop or (0, 0)
            out = out + branch.bn(branch.conv(x[..., ch : x.shape[2] - ch, cw : x.shape[3] - cw]))
            continue
        assert isinstance(branch, ComposedBranch)
        inner = x if branch.first is None else branch.first_bn(branch.first(x))
        pad_value = None
        if branch.first is not None and branch.padding_mode == "zeros":
            pad_value = _zero_input_output(branch.first_bn)  # after this batch's update, as the fused conv sees it
        out = out + branch.bn(branch.second(_pad(inner, branch.padding, branch.padding_mode, pad_value)))
    return out


def _block(case) -> DBBlock:
    cin, cout, kernel, stride, padding, groups, mode, momentum = case
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, padding_mode=mode, dtype=torch.float64)
    bn = nn.BatchNorm2d(cout, momentum=momentum, dtype=torch.float64)
    block = DBBlock.from_conv(conv, bn, init="scratch")
    randomize_bn(block)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_()
    return block


def _step(model, run, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``run(model, x)`` and the gradient of its sum weighted by random numbers (the same ones for the same seed)."""
    x = x.clone().requires_grad_()
    out = run(model, x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_forward_backward_and_running_statistics_equal_the_reference(case, train):
    block = _block(case).train(train)
    ref = copy.deepcopy(block)
    for seed in range(2):  # the second step sees the running statistics the first one updated
        x = torch.randn(3, case[0], 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + seed))
        block.zero_grad()
        ref.zero_grad()
        out, grad_x = _step(block, DBBlock.__call__, x, seed)
        want, want_grad_x = _step(ref, reference, x, seed)
        assert relative_error(want, out) <= 1e-12  # relative, float64
        assert relative_error(want_grad_x, grad_x) <= 1e-12  # relative, float64
        for (name, p), q in zip(ref.named_parameters(), block.parameters()):
            assert relative_error(p.grad, q.grad) <= 1e-12, name  # relative, float64
        for (name, b), c in zip(ref.named_buffers(), block.buffers()):
            assert relative_error(b.double(), c.double()) <= 1e-12, name  # relative, float64
