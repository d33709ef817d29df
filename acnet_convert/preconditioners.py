"""RepOpt's algebra: the constant gradient preconditioner under which one conv trains as a CSLA block does.

A CSLA block sums linear branches, each a trainable kernel ``Wᵢ`` put into the KxK kernel by a fixed linear map
``Aᵢ`` and multiplied by a constant per-output-channel scale ``αᵢ``: ``W = Σᵢ αᵢ·Aᵢ(Wᵢ)``.  An SGD step on every
``Wᵢ`` moves ``W`` by ``-lr·P(∂L/∂W)`` with ``P = Σᵢ αᵢ²·AᵢAᵢᵀ``.  A branch that zero-pads a smaller kernel adds
``αᵢ²`` on the taps it covers (an element-wise mask); the average pool after a 1x1 spreads the 1x1 kernel evenly
over the ``T = kh·kw`` taps, so it adds ``αᵢ²/T²`` times the gradient's sum over the taps to every tap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .kernels import embed_centre, identity_kernel

# The trainable branches of each kind's CSLA form, by the names its scales are recorded under ("square" first).
# RepVGG's identity branch (where it fits) is a trainable per-channel scale with the constant multiplier 1.
# DBB's 1x1-KxK branch is bilinear in its two kernels, so no constant preconditioner reproduces it: it is left out.
BRANCHES = {
    "acb": ("square", "row", "column"),
    "repvgg": ("square", "pointwise"),
    "dbb": ("square", "pointwise", "avg"),
}


def branches(kind: str, *, depthwise: bool) -> tuple[str, ...]:
    """The branches of ``kind``'s CSLA form around a conv (a depthwise DBB has no 1x1 branch)."""
    names = BRANCHES[kind]
    return tuple(n for n in names if not (kind == "dbb" and depthwise and n == "pointwise"))


def preconditioner(
    kind: str,
    shape: Sequence[int],
    groups: int,
    scales: Mapping[str, Tensor],
    *,
    identity: bool,
    power: int = 2,
) -> tuple[Tensor, Tensor | None]:
    """``(mask, pool)`` of ``P(G) = mask·G + pool·Σ_taps G`` for a 2D kernel of ``shape`` (float64; ``mask`` has
    one input channel, broadcast, unless RepVGG's identity makes the input channels differ).

    ``scales`` maps each branch to its scales (one per output channel, or one for all); ``identity`` adds
    RepVGG's identity branch (in == out channels, stride 1).  ``pool`` (one per output channel) is None but for
    DBB.  ``power=1`` gives ``Σᵢ|αᵢ|`` per tap instead: how far AdamW moves the kernel per unit of its own
    update (each branch's Adam step is the kernel's, up to ε, times the sign of its scale).
    """
    out, width, kh, kw = shape
    row, column = kh // 2, kw // 2

    def part(name: str) -> Tensor:  # |αᵢ|^power, one per output channel, broadcast over the kernel
        return scales[name].to(torch.float64).reshape(-1, 1, 1, 1).abs() ** power

    mask = torch.zeros(out, 1, kh, kw, dtype=torch.float64) + part("square")  # the same for every input channel
    if kind == "acb":
        mask[:, :, row : row + 1, :] += part("row")
        mask[:, :, :, column : column + 1] += part("column")
    if "pointwise" in scales:
        mask[:, :, row : row + 1, column : column + 1] += part("pointwise")
    if kind == "repvgg" and identity:
        mask = mask + embed_centre(identity_kernel(out, width * groups, groups, dtype=torch.float64), (kh, kw))
    pool = None
    if kind == "dbb":
        pool = (part("avg") / (kh * kw) ** 2).expand(out, 1, 1, 1).clone()
    return mask, pool


def precondition(grad: Tensor, mask: Tensor, pool: Tensor | None) -> Tensor:
    """``P(grad)``: the kernel's gradient as the CSLA branches' SGD steps move the kernel."""
    moved = grad * mask
    if pool is not None:
        moved = moved + pool * grad.sum((2, 3), keepdim=True)
    return moved


def csla_kernel(
    kind: str, kernels: Mapping[str, Tensor], scales: Mapping[str, Tensor], groups: int, *, identity: bool
) -> Tensor:
    """``Σᵢ αᵢ·Aᵢ(Wᵢ)``: the kernel of a CSLA block from its branch kernels (``square`` KxK, ``row`` 1xK,
    ``column`` Kx1, ``pointwise`` 1x1, ``avg`` the 1x1 before the average pool, one per channel when depthwise);
    the identity branch counts with its scale at 1."""
    square = kernels["square"]
    out, width, kh, kw = square.shape

    def times(name: str) -> Tensor:
        return kernels[name] * scales[name].to(square.dtype).reshape(-1, 1, 1, 1)

    kernel = times("square")
    for name in ("row", "column", "pointwise"):
        if name in kernels:
            kernel = kernel + embed_centre(times(name), (kh, kw))
    if "avg" in kernels:
        kernel = kernel + times("avg").expand(out, width, kh, kw) / (kh * kw)
    if kind == "repvgg" and identity:
        ident = identity_kernel(out, width * groups, groups, dtype=square.dtype, device=square.device)
        kernel = kernel + embed_centre(ident, (kh, kw))
    return kernel
