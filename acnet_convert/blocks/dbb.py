"""The Diverse Branch Block (DBB, "ACNet v2"): KxK + 1x1 + 1x1-average-pool + 1x1-KxK branches, exact and fast.

Every branch folds into the KxK kernel: a BatchNorm into the conv before it, a 1x1 conv followed by a
KxK conv or average pool into one KxK kernel (``compose_1x1_kxk``, exact because the 1x1 output is padded
with the value its BatchNorm gives a zero input), an average pool into a constant kernel
(``avg_pool_kernel``), a 1x1 kernel into the centre of the KxK one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import (
    Kernel,
    avg_pool_kernel,
    bn_zero_output,
    channel_moments,
    compose_1x1_kxk,
    compose_1x1_kxk_weight,
    embed_centre,
    fold_bn,  # fmt: skip
    identity_kernel,
    pointwise_moments,
    scaled,
)
from .branches import ConvBranch, new_bn, plain_conv_problem, pointwise_branch
from .forms import ComposedKernel, SummedBranches
from .geometry import conv_padding, pad_like_conv


def dbb_problem(conv: nn.Module) -> str:
    """Why a Diverse Branch Block cannot wrap ``conv``, or '' when it can."""
    problem = plain_conv_problem(conv)
    if not problem and any(d != 1 for d in conv.dilation):
        problem = "dilation > 1: the average-pool branch has no dilated form"
    return problem


def is_depthwise(conv: nn.Module) -> bool:
    """Whether ``conv`` maps each channel to itself alone (groups == in == out channels): no 1x1 branch then."""
    return conv.groups == conv.in_channels == conv.out_channels


def inner_width(conv: nn.Module) -> int:
    """The width of the 1x1-KxK branch between its two convs: in_channels, twice that for a depthwise conv."""
    return conv.in_channels * (2 if is_depthwise(conv) else 1)


def describe_dbb(conv: nn.Module) -> str:
    """The branches of a DBB around ``conv`` as text, e.g. ``3x3 + 1x1 + 1x1-avg + 1x1-3x3``."""
    square = "x".join(map(str, conv.kernel_size))
    if is_depthwise(conv):
        return f"{square} + avg + 1x1-{square}"
    return f"{square} + 1x1 + 1x1-avg + 1x1-{square}"


class ComposedBranch(nn.Module):
    """An optional 1x1 conv with its BatchNorm, padded as the full conv pads its input, then a KxK conv or average
    pool and a BatchNorm.

    Zero padding of the 1x1 output uses what its BatchNorm outputs for a zero input (from the running
    statistics, in training too), which is what the fused conv sees through its zero-padded input.
    A plain BatchNorm2d after the 1x1 is folded into it from the input's moments (``folded_first``), so the
    1x1 output is never computed: the KxK conv runs on the input with the composed kernel, the pool before the 1x1.
    """

    def __init__(
        self, first: nn.Conv2d | None, first_bn: nn.Module | None, second: nn.Module, bn: nn.Module,
        conv: nn.Conv2d,
    ):
        super().__init__()
        self.first, self.first_bn, self.second, self.bn = first, first_bn, second, bn
        self.padding, self.padding_mode, self.groups = conv_padding(conv), conv.padding_mode, conv.groups

    def forward(self, x: Tensor, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The branch's output; ``moments`` are the input's ``channel_moments`` when the caller has them."""
        if self.first is None:
            if self.padding_mode == "zeros":
                return self.bn(self.zero_padded_second(x))
            return self.bn(self.second(pad_like_conv(x, self.padding, self.padding_mode)))
        if self.folds(x):
            return self.bn(self.composed(x, moments))
        x = self.first_bn(self.first(x))
        if self.padding_mode != "zeros" or not any(self.padding):
            return self.bn(self.second(pad_like_conv(x, self.padding, self.padding_mode)))
        # second(x padded with the value) = second(x zero-padded) + second(a zero sample padded with the value):
        # the conv or pool pads by itself, and the border's share is computed for one sample, not the batch
        border = border_image(bn_zero_output(self.first_bn, x.dtype), x, self.padding)
        return self.bn(self.zero_padded_second(x) + self.second(border))

    def folds(self, x: Tensor) -> bool:
        """Whether this branch runs ``composed`` for input ``x``: where its first BatchNorm can be folded and, in
        training, composing the KxK kernel costs less than the 1x1 conv it saves (a product of the kernels against
        one of the 1x1 kernel with every input position)."""
        if self.first is None or not foldable(self.first_bn):
            return False
        if not self.first_bn.training:
            return True
        positions = x.numel() // x.shape[1]  # a BatchNorm in training refuses a single value per channel
        second = self.second.weight if isinstance(self.second, nn.Conv2d) else None
        per_position = 0 if second is None else second.shape[0] // self.groups * second[0, 0].numel()
        return positions > 1 and per_position < positions

    def composed(self, x: Tensor, moments: tuple[Tensor, Tensor] | None) -> Tensor:
        """``second(pad(first_bn(first(x))))`` without the 1x1 output: both are linear per position, so the
        composed kernel (or the pool, then the folded 1x1) runs on ``x``, and the constant part on one sample."""
        weight, shift = self.folded_first(x, moments)
        zeros = self.padding_mode == "zeros"
        constant = self.second(constant_image(shift, bn_zero_output(self.first_bn, x.dtype) if zeros else shift,
                                              x, self.padding))  # fmt: skip
        if not zeros:
            x = pad_like_conv(x, self.padding, self.padding_mode)
        if isinstance(self.second, nn.Conv2d):
            kernel = compose_pointwise_kxk(weight, self.second.weight, self.groups)
            padding = self.padding if zeros else 0
            return F.conv2d(x, kernel, None, self.second.stride, padding, 1, self.groups) + constant
        pooled = self.zero_padded_second(x) if zeros else self.second(x)
        return F.conv2d(pooled, weight, None, 1, 0, 1, self.groups) + constant

    def folded_first(self, x: Tensor, moments: tuple[Tensor, Tensor] | None) -> Kernel:
        """The 1x1 conv's kernel with its BatchNorm folded in, and the BatchNorm's shift, differentiable.

        In training the BatchNorm's batch statistics are those of the 1x1 output, found from the input's mean and
        covariance, and its running statistics are updated as a forward of the BatchNorm would update them.
        """
        bn, weight = self.first_bn, self.first.weight
        if bn.training:
            mean, cov = input_moments(x, self.groups) if moments is None else moments
            with torch.autocast(x.device.type, enabled=False):
                mean, var = pointwise_moments(weight.to(mean.dtype), mean, cov, self.groups)
            track_batch_statistics(bn, mean, var, x.numel() // x.shape[1])
        else:
            mean, var = bn.running_mean, bn.running_var
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scaled(weight, scale.to(weight.dtype)), shift.to(weight.dtype)

    def zero_padded_second(self, x: Tensor) -> Tensor:
        """The KxK conv or average pool of ``x`` zero-padded as the full conv pads, padding inside the operation."""
        second, padding = self.second, self.padding
        if isinstance(second, nn.Conv2d):
            return F.conv2d(x, second.weight, None, second.stride, padding, 1, second.groups)
        if all(p <= k // 2 for p, k in zip(padding, second.kernel_size)):  # what avg_pool2d can pad by itself
            return average_pool(x, second.kernel_size, second.stride, padding)
        return average_pool(pad_like_conv(x, padding, "zeros"), second.kernel_size, second.stride, (0, 0))

    def second_weight(self, dtype: torch.dtype) -> Tensor:
        """The KxK kernel of the conv or average pool after the 1x1."""
        if isinstance(self.second, nn.Conv2d):
            return self.second.weight.to(dtype)
        ref = self.bn.running_mean
        channels = ref.shape[0]
        return avg_pool_kernel(channels, self.second.kernel_size, self.groups, dtype=dtype, device=ref.device)

    def kernel(self, dtype: torch.dtype) -> Kernel:
        """This branch's KxK kernel and bias with its BatchNorms folded in."""
        second = self.second_weight(dtype)
        bias = second.new_zeros(second.shape[0])
        if self.first is not None:
            first = fold_bn(self.first.weight.to(dtype), None, self.first_bn)
            second, bias = compose_1x1_kxk(first, (second, bias), self.groups)
        return fold_bn(second, bias, self.bn)


class DBBlock(SummedBranches):
    """The Diverse Branch Block: KxK-BN + 1x1-BN + 1x1-BN-avgpool-BN + 1x1-BN-KxK-BN, outputs summed.

    A depthwise conv (groups == in == out) gets no 1x1 branch, an average pool straight on the input and
    a 1x1-KxK branch twice as wide as its input.  Any padding and padding mode; no dilation.  The 1x1 of the
    1x1-KxK branch starts as the identity (each inner channel a copy of an input channel); ``init="preserve"``
    starts each new branch's last BatchNorm with gamma = beta = 0, ``init="scratch"`` those gammas and the
    absorbed BatchNorm's at ``gamma_init``.
    """

    kind = "dbb"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return dbb_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return describe_dbb(conv)

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        branches = {"square": ConvBranch(conv, bn if bn is not None else nn.Identity())}
        if not is_depthwise(conv):
            branches["pointwise"] = pointwise_branch(conv, new_bn(bn, conv.out_channels, **factory), **factory)
        branches["avg"] = _avg_branch(conv, bn, **factory)
        branches["pointwise_kxk"] = _pointwise_kxk_branch(conv, bn, **factory)
        return branches

    def branch_outputs(self, x: Tensor) -> Iterator[Tensor]:
        """Every branch's output; the composed branches that fold share one computation of the input's moments."""
        folding = [b for b in self.branches.values() if isinstance(b, ComposedBranch) and b.folds(x)]
        moments = input_moments(x, self.groups) if any(b.first_bn.training for b in folding) else None
        for branch in self.branches.values():
            yield branch(x, moments) if isinstance(branch, ComposedBranch) else branch(x)


@torch.fx.wrap
def average_pool(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """``F.avg_pool2d`` (zero padding counted); on the CPU at stride 1 as a depthwise conv with a constant kernel,
    the same sums, computed (forward and backward) several times faster there.  Autocast is off for the conv, so
    it runs in ``x``'s dtype, as the pool does.  One node in a ``torch.fx`` graph."""
    if x.device.type != "cpu" or any(s != 1 for s in stride):
        return F.avg_pool2d(x, kernel_size, stride, padding)
    kernel = avg_pool_kernel(x.shape[1], kernel_size, x.shape[1], dtype=x.dtype, device=x.device)
    with torch.autocast("cpu", enabled=False):
        return F.conv2d(x, kernel, None, 1, padding, 1, x.shape[1])


def border_image(value: Tensor, x: Tensor, padding: tuple[int, int]) -> Tensor:
    """One zero sample the size of ``x``'s, padded by ``padding`` with ``value`` per channel."""
    inside = F.pad(torch.ones_like(x[:1, :1]), (padding[1], padding[1], padding[0], padding[0]))
    return (1 - inside) * value.reshape(1, -1, 1, 1)


def constant_image(inside: Tensor, border: Tensor, x: Tensor, padding: tuple[int, int]) -> Tensor:
    """One sample the size of ``x``'s, ``inside`` per channel, padded by ``padding`` with ``border`` per channel."""
    return border_image(border - inside, x, padding) + inside.reshape(1, -1, 1, 1)


@torch.fx.wrap
def compose_pointwise_kxk(pointwise: Tensor, kxk: Tensor, groups: int) -> Tensor:
    """``compose_1x1_kxk_weight``, one node in a ``torch.fx`` graph (its steps depend on the kernels' shapes), laid
    out contiguously: a channels-last kernel would make the conv's output, and every operation after it, channels
    last."""
    return compose_1x1_kxk_weight(pointwise, kxk, groups).contiguous()


def input_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """``channel_moments`` of ``x``, at least in float32 (autocast off), as a BatchNorm computes its statistics."""
    with torch.autocast(x.device.type, enabled=False):
        return channel_moments(x.to(torch.promote_types(x.dtype, torch.float32)), groups)


def foldable(bn: nn.Module) -> bool:
    """Whether the batch statistics of ``bn``'s input may be found from its conv's input: a plain BatchNorm2d that
    tracks running statistics (a SyncBatchNorm's statistics span processes)."""
    return type(bn) is nn.BatchNorm2d and bn.track_running_stats


def track_batch_statistics(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Update ``bn``'s running statistics with a batch's (biased) ``mean`` and ``var`` over ``count`` values per
    channel, as its own forward in training does."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)


def _avg_branch(conv: nn.Conv2d, bn: nn.Module | None, **factory) -> ComposedBranch:
    """The average-pool branch: 1x1-BN (none for a depthwise conv), KxK average pool with the conv's stride, BN."""
    first = first_bn = None
    if not is_depthwise(conv):
        first = nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=False, **factory)
        first_bn = new_bn(bn, conv.out_channels, **factory)
    pool = nn.AvgPool2d(conv.kernel_size, conv.stride, 0)
    return ComposedBranch(first, first_bn, pool, new_bn(bn, conv.out_channels, **factory), conv)


def _pointwise_kxk_branch(conv: nn.Conv2d, bn: nn.Module | None, **factory) -> ComposedBranch:
    """The 1x1-BN-KxK-BN branch, its 1x1 starting as the identity."""
    width = inner_width(conv)
    first = nn.Conv2d(conv.in_channels, width, 1, groups=conv.groups, bias=False, **factory)
    with torch.no_grad():
        first.weight.copy_(identity_kernel(width, conv.in_channels, conv.groups, **factory))
    second = nn.Conv2d(width, conv.out_channels, conv.kernel_size, conv.stride, 0, groups=conv.groups, bias=False,
                       **factory)  # fmt: skip
    return ComposedBranch(first, new_bn(bn, width, **factory), second, new_bn(bn, conv.out_channels, **factory), conv)


class FastDBBlock(ComposedKernel):
    """DBB linearised: one conv whose kernel is composed, every forward, from the scaled branch kernels.

    ``kernel = s_square * weight + centre(s_1x1 * weight_1x1) + s_avg * (weight_avg then average pool)
    + s_kxk * (weight_inner then weight_outer)``, one learnable scale per output channel and branch; no
    BatchNorm inside (the one after the conv stays in the model) and the conv's own bias, if any, is kept.
    """

    kind = "dbb"
    mode = "fast"
    absorbs_bn = False

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return dbb_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return describe_dbb(conv) + " (composed)"

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        """New kernels start as in exact mode: PyTorch's default, the 1x1 before the inner KxK as the identity."""
        pointwise = not is_depthwise(conv)
        for name in ("weight_1x1", "weight_avg"):
            self.register_parameter(name, _pointwise_weight(conv, **factory) if pointwise else None)
        width = inner_width(conv)
        self.weight_inner = nn.Parameter(identity_kernel(width, conv.in_channels, conv.groups, **factory))
        self.weight_outer = nn.Conv2d(width, conv.out_channels, conv.kernel_size, groups=conv.groups, bias=False,
                                      **factory).weight  # fmt: skip
        for name in ("scale_square", "scale_1x1", "scale_avg", "scale_kxk"):
            scale = nn.Parameter(torch.ones(conv.out_channels, **factory))
            self.register_parameter(name, scale if pointwise or name != "scale_1x1" else None)

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        tensors = (self.weight, self.weight_1x1, self.weight_avg, self.weight_inner, self.weight_outer,
                   self.scale_square, self.scale_1x1, self.scale_avg, self.scale_kxk)  # fmt: skip
        return compose_dbb(self.groups, *(t if dtype is None or t is None else t.to(dtype) for t in tensors))


def _pointwise_weight(conv: nn.Conv2d, **factory) -> nn.Parameter:
    """A 1x1 kernel with ``conv``'s channels and groups, initialised as PyTorch initialises a conv's."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=False, **factory).weight


@torch.fx.wrap
def compose_dbb(
    groups: int, weight: Tensor, weight_1x1: Tensor | None, weight_avg: Tensor | None, weight_inner: Tensor,
    weight_outer: Tensor, scale_square: Tensor, scale_1x1: Tensor | None, scale_avg: Tensor, scale_kxk: Tensor,
) -> Tensor:
    """The fast DBB's kernel: the scaled KxK, 1x1 (at the centre), 1x1-average-pool and 1x1-KxK kernels summed.

    The average pool keeps each channel to itself, so the 1x1-average-pool kernel is the 1x1 kernel (the identity
    for a depthwise conv) spread evenly over the KxK taps: a broadcast, not a kernel product.
    One node in a ``torch.fx`` graph: symbolic tracing records the call, not its shape-dependent steps.
    """
    taps = weight.shape[2] * weight.shape[3]
    avg = scale_avg.reshape(-1, 1, 1, 1) if weight_avg is None else scaled(weight_avg, scale_avg)
    kxk = compose_1x1_kxk_weight(weight_inner, weight_outer, groups)
    kernel = scaled(weight, scale_square) + scaled(kxk, scale_kxk) + avg / taps
    if weight_1x1 is not None:
        kernel = kernel + embed_centre(scaled(weight_1x1, scale_1x1), weight.shape[2:])
    return kernel

