"""Example inputs for checks and example runs: random tensors of given shapes, or real tensors read from a file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import ACNetError


def random_inputs(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> tuple[Tensor, ...]:
    """One reproducible standard-normal tensor per shape, in ``dtype`` on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes)


def at_batch(shapes: list[tuple[int, ...]], batch: int) -> list[tuple[int, ...]]:
    """``shapes`` with the first (batch) dimension set to ``batch``."""
    return [(batch, *shape[1:]) for shape in shapes]


def load_inputs(path: str | Path) -> tuple[Tensor, ...]:
    """The tensors a file saved with ``torch.save`` holds: one tensor, or a tuple or list of them (model(*inputs))."""
    path = Path(path)
    if not path.is_file():
        raise ACNetError(f"inputs file {path} not found: write it with torch.save(x, path) or torch.save((x, y), path)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise ACNetError(f"{path} is not a readable tensor file ({type(exc).__name__}): use torch.save") from exc
    inputs = (loaded,) if isinstance(loaded, Tensor) else tuple(loaded) if isinstance(loaded, (tuple, list)) else ()
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ACNetError(
            f"{path} holds a {type(loaded).__name__}: save a tensor or a tuple of tensors, one per model input"
        )
    return inputs


def shape_text(shapes: list[tuple[int, ...]]) -> str:
    """'2x3x32x32' for one shape, '2x3x32x32 and 2x1x32x32' for several."""
    return " and ".join("x".join(map(str, shape)) for shape in shapes)
