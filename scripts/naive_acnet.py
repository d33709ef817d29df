"""A deliberately plain ACNet, the yardstick that scripts/bench.py measures acnet-convert against.

It walks the module tree, and replaces every Conv2d with odd kernel sides >= 3, zero padding and enough of it
by three separate conv + BatchNorm branches whose outputs are summed; a BatchNorm registered right after the conv
(same parent, same channels) becomes the square branch's BatchNorm. No data-flow analysis and no optimisation:
the pairing by registration order is only right for models built like torchvision's, so use it for timing only.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


class NaiveACBlock(nn.Module):
    """KxK, 1xK and Kx1 conv + BatchNorm branches, summed."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
        self.square, self.square_bn = conv, bn
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        options = {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups, "bias": False, **factory}
        self.hor = nn.Conv2d(conv.in_channels, conv.out_channels, (1, kw), padding=(ph - dh * (kh // 2), pw), **options)
        self.ver = nn.Conv2d(conv.in_channels, conv.out_channels, (kh, 1), padding=(ph, pw - dw * (kw // 2)), **options)
        self.hor_bn = nn.BatchNorm2d(conv.out_channels, **factory)
        self.ver_bn = nn.BatchNorm2d(conv.out_channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.square_bn(self.square(x)) + self.hor_bn(self.hor(x)) + self.ver_bn(self.ver(x))


def eligible(conv: nn.Module) -> bool:
    """Whether the plain recipe applies: odd kernel sides >= 3 and zero padding reaching the centre lines."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    sides = zip(conv.kernel_size, conv.padding, conv.dilation)
    return all(k % 2 == 1 and k >= 3 and p >= d * (k // 2) for k, p, d in sides)


def naive_acify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eligible conv (and the BatchNorm registered after it) made a NaiveACBlock."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for i, (name, conv) in enumerate(children):
            if not eligible(conv):
                continue
            bn_name, bn = children[i + 1] if i + 1 < len(children) else (None, None)
            if isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
                setattr(parent, bn_name, nn.Identity())
            else:
                bn = nn.Identity()
            setattr(parent, name, NaiveACBlock(conv, bn))
    return model
