"""Adapters: the one place that knows conv, BatchNorm and model classes which do more than a plain one.

A norm adapter names what a BatchNorm subclass does after normalising (timm's ``BatchNormAct2d``: dropout, then
the activation): the BatchNorm part is absorbed into the block and those modules stay at the BatchNorm's place.
A conv adapter names how a conv subclass pads its input in ``forward`` before convolving (timm's ``Conv2dSame``,
segmentation-models-pytorch's ``Conv2dStaticSamePadding``): the block pads the same way, then runs its branches.
A self-fusing model class has a method of its own that folds each conv's BatchNorm into the conv by reading their
weights (Ultralytics' ``BaseModel.fuse``): on an acified model that method first gets the structure it was written
for back. Classes are named by ``module.QualName`` so that nothing here imports the libraries that define them; add
entries for your own classes with ``register_norm_adapter`` and ``register_conv_adapter``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ACNetError
from ..modules import class_path


@dataclass(frozen=True)
class NormAdapter:
    """A BatchNorm subclass whose ``forward`` normalises, then applies the children named in ``after``, in order."""

    after: tuple[str, ...]


@dataclass(frozen=True)
class ConvAdapter:
    """A conv subclass whose ``forward`` applies ``pad(conv)`` to its input, then the plain convolution."""

    pad: Callable[[nn.Module], nn.Module]


class NormTail(nn.Module):
    """What a BatchNorm subclass does after normalising, kept at its place (children under their own names)."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        super().__init__()
        for name, module in modules:
            self.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


class SamePad(nn.Module):
    """TensorFlow's "same" padding, computed from the input size (the extra row or column goes last)."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):  # fmt: skip
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


NORM_ADAPTERS: dict[str, NormAdapter] = {
    "timm.layers.norm_act.BatchNormAct2d": NormAdapter(("drop", "act")),
    "timm.layers.norm_act.SyncBatchNormAct": NormAdapter(("drop", "act")),
}
CONV_ADAPTERS: dict[str, ConvAdapter] = {
    "timm.layers.conv2d_same.Conv2dSame": ConvAdapter(lambda c: SamePad(c.kernel_size, c.stride, c.dilation)),
    "segmentation_models_pytorch.encoders._efficientnet.Conv2dStaticSamePadding": ConvAdapter(
        lambda c: c.static_padding
    ),
    "efficientnet_pytorch.utils.Conv2dStaticSamePadding": ConvAdapter(lambda c: c.static_padding),
}
SELF_FUSING_MODELS: dict[str, str] = {  # class -> the name of its own fusion method
    "ultralytics.nn.tasks.BaseModel": "fuse",
}


def register_norm_adapter(cls: type | str, after: Sequence[str]) -> None:
    """Let a BatchNorm subclass be absorbed: its ``forward`` normalises, then applies the children ``after``."""
    NORM_ADAPTERS[cls if isinstance(cls, str) else class_path(cls)] = NormAdapter(tuple(after))


def register_conv_adapter(cls: type | str, pad: Callable[[nn.Module], nn.Module]) -> None:
    """Let a conv subclass be converted: its ``forward`` applies the module ``pad(conv)``, then the plain conv."""
    CONV_ADAPTERS[cls if isinstance(cls, str) else class_path(cls)] = ConvAdapter(pad)


def norm_adapter(bn: nn.Module) -> NormAdapter | None:
    """The adapter of ``bn``'s class, or None."""
    return NORM_ADAPTERS.get(class_path(type(bn)))


def conv_adapter(conv: nn.Module) -> ConvAdapter | None:
    """The adapter of ``conv``'s class, or None."""
    return CONV_ADAPTERS.get(class_path(type(conv)))


def own_fusion(model: nn.Module) -> str | None:
    """The name of the fusion method ``model``'s class (or a base class) has of its own, or None."""
    return next((SELF_FUSING_MODELS[p] for p in map(class_path, type(model).__mro__) if p in SELF_FUSING_MODELS), None)


def batchnorm_part(bn: _BatchNorm) -> _BatchNorm:
    """A plain BatchNorm sharing ``bn``'s parameters and statistics (the part a block absorbs)."""
    if norm_adapter(bn) is None:
        return bn
    plain = next(c for c in (nn.SyncBatchNorm, nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d) if isinstance(bn, c))
    part = plain(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name in ("weight", "bias"):
        setattr(part, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        part.register_buffer(name, getattr(bn, name))
    part.train(bn.training)
    return part


def norm_tail(bn: nn.Module) -> nn.Module:
    """What stays at an absorbed BatchNorm's place: ``nn.Identity`` or the modules its class applies afterwards."""
    adapter = norm_adapter(bn)
    if adapter is None:
        return nn.Identity()
    missing = [name for name in adapter.after if not isinstance(getattr(bn, name, None), nn.Module)]
    if missing:
        raise ACNetError(f"{type(bn).__name__} has no module {missing[0]!r}: fix its entry in the norm adapter table")
    return NormTail([(name, getattr(bn, name)) for name in adapter.after])


def plain_conv(conv: nn.Module) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s settings sharing its parameters (the convolution of a padding subclass)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # fmt: skip
    plain.weight = conv.weight
    plain.bias = conv.bias
    plain.train(conv.training)
    return plain
