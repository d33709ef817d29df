"""Where a branch's kernel sits in the full kernel, and how its conv must pad or crop to read the same input.

Plain functions of kernel sizes, paddings and dilations (any number of spatial dimensions), shared by every kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import LAYOUTS
from ..errors import ACNetError

BLOCK_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)  # the conv classes a block can wrap and fuse into
_LINE_NAMES = {2: ("ver", "hor"), 3: ("depth", "ver", "hor")}  # a centre line along each axis
_PLANE_NAMES = ("plane_hw", "plane_dw", "plane_dh")  # a centre plane across each axis of a 3D kernel


@dataclass(frozen=True)
class BranchGeometry:
    """How one branch reproduces its slice of the full kernel: its kernel size, conv padding, input crop, output
    pad."""

    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    crop: tuple[int, ...]
    pad: tuple[int, ...]


def resolve_padding(padding: str | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Per-axis symmetric padding of a conv with odd kernel sides ('same' and 'valid' resolved)."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return tuple(padding)


def conv_padding(conv: nn.Module) -> tuple[int, ...]:
    """The symmetric padding ``conv`` (or a block) applies on each axis ('same' and 'valid' resolved)."""
    return resolve_padding(conv.padding, conv.kernel_size, conv.dilation)


def pad_like_conv(x: Tensor, padding: Sequence[int], padding_mode: str) -> Tensor:
    """``x`` padded by ``padding`` on each spatial axis as a conv with ``padding_mode`` pads its input."""
    if not any(padding):
        return x
    pads = [p for side in reversed(tuple(padding)) for p in (side, side)]
    return F.pad(x, pads) if padding_mode == "zeros" else F.pad(x, pads, mode=padding_mode)


def branch_geometry(
    full_kernel: Sequence[int],
    branch_kernel: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool = False,
) -> BranchGeometry:
    """Geometry of a centred sub-kernel branch.

    A branch whose kernel is shorter along an axis sees the input shifted by
    ``dilation * (K - k) // 2`` there.  Reducing the padding by that offset reproduces
    the shift.  Where the padding is smaller than the offset, a conv crops its input
    instead (the full conv never reads those border rows through the centre line) and a
    transposed conv zero-pads its output (the centre line never writes there).
    """
    pads, crops, out_pads = [], [], []
    for full, k, p, d in zip(full_kernel, branch_kernel, padding, dilation):
        shifted = p - d * (full - k) // 2
        pads.append(max(shifted, 0))
        (out_pads if transposed else crops).append(max(-shifted, 0))
        (crops if transposed else out_pads).append(0)
    return BranchGeometry(tuple(branch_kernel), tuple(pads), tuple(crops), tuple(out_pads))


def branch_kernels(kernel: Sequence[int], layout: str = "lines") -> dict[str, tuple[int, ...]]:
    """ACB's asymmetric branches by name, each with its kernel size: a centre line along each side >= 3, or for
    ``layout="planes"`` (3D kernels with every side >= 3) the centre plane across each axis."""
    if layout not in LAYOUTS:
        raise ACNetError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    kernel = tuple(kernel)
    if layout == "planes" and len(kernel) == 3 and min(kernel) >= 3:
        return {name: kernel[:axis] + (1,) + kernel[axis + 1 :] for axis, name in enumerate(_PLANE_NAMES)}
    return {
        name: tuple(k if i == axis else 1 for i, k in enumerate(kernel))
        for axis, name in enumerate(_LINE_NAMES[len(kernel)])
        if kernel[axis] >= 3
    }


def describe_layout(kernel: Sequence[int], layout: str = "lines") -> str:
    """ACB's branches around a kernel of size ``kernel`` as text, e.g. ``3x3 + 3x1 + 1x3``."""
    shapes = [tuple(kernel), *branch_kernels(kernel, layout).values()]
    return " + ".join("x".join(map(str, shape)) for shape in shapes)


def kernel_problem(kernel: Sequence[int]) -> str:
    """Why an ACBlock cannot be built around a kernel of size ``kernel``, or '' when it can."""
    if any(k % 2 == 0 for k in kernel):
        return "even kernel side: the branches have no centre line"
    if sum(k >= 3 for k in kernel) < 2:
        return "needs at least two kernel sides >= 3"
    return ""
