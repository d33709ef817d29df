"""The inputs of the checks and example runs: random ones of given shapes, real ones from a file, or both."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..constants import DEVICES
from ..errors import ACNetError, in_one_line
from .options import InputOptions

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

DEFAULT_SHAPE = (1, 3, 224, 224)


@dataclass
class Examples:
    """The example inputs of one command run."""

    shapes: list[tuple[int, ...]] | None  # given with --input-shape; None: stored, else from --inputs, else default
    real: tuple | None
    source: str | None  # the file the real inputs come from
    device: str
    defaulted: bool = False  # the shapes are the default, chosen by nobody

    @classmethod
    def given(cls, options: InputOptions) -> Examples:
        """The inputs the command line names: shapes parsed, the inputs file read, the device checked."""
        from ..files.inputs import load_inputs

        _check_device(options.device)
        shapes = [_parse_shape(text) for text in options.input_shape] if options.input_shape else None
        real = load_inputs(options.inputs) if options.inputs else None
        return cls(shapes, real, options.inputs, options.device)

    def on_cpu(self) -> Examples:
        """The same inputs, on the CPU."""
        return Examples(self.shapes, self.real, self.source, "cpu", self.defaulted)

    def settle(self, stored: list[tuple[int, ...]] | None) -> None:
        """Fix the random inputs' shapes: given, else stored in the checkpoint, else those of --inputs, else default."""
        if self.shapes is None:
            self.shapes = stored or ([tuple(x.shape) for x in self.real] if self.real else None)
            self.shapes, self.defaulted = self.shapes or [DEFAULT_SHAPE], not self.shapes

    def random(self, model: nn.Module, seed: int = 0) -> tuple[Tensor, ...]:
        """Standard-normal inputs in the model's floating-point dtype, on the device."""
        from ..files.inputs import random_inputs

        self.settle(None)
        return random_inputs(self.shapes, _dtype(model), self.device, seed)

    def first(self, model: nn.Module) -> tuple[Tensor, ...]:
        """The real inputs when given, else the first random ones."""
        if self.real:
            return tuple(x.to(self.device, _dtype(model)) if x.is_floating_point() else x.to(self.device)
                         for x in self.real)  # fmt: skip
        return self.random(model)

    def all(self, model: nn.Module, samples: int) -> Iterator[tuple[Tensor, ...]]:
        """``samples`` random inputs, then the real ones when given."""
        for seed in range(samples):
            yield self.random(model, seed)
        if self.real:
            yield self.first(model)

    def recorded(self) -> dict:
        """What a checkpoint records of the input shapes (the first, and all when several); nothing for the default."""
        self.settle(None)
        if self.defaulted:
            return {}
        shapes = [list(shape) for shape in self.shapes]
        return {"input_shape": shapes[0], **({"input_shapes": shapes} if len(shapes) > 1 else {})}

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Report a model that fails on the example inputs as an input error naming the option to change."""
        try:
            yield
        except ACNetError:
            raise
        except Exception as exc:
            from ..files.inputs import shape_text

            shapes = shape_text(self.shapes)
            what = f"the inputs from {self.source}" if self.real else f"a random input of shape {shapes}"
            raise ACNetError(
                f"the model failed on {what} ({in_one_line(exc)}): pass --input-shape with the shape it expects "
                "(once per input, e.g. 1,3,224,224), or --inputs FILE.pt"
            ) from exc


def _dtype(model: nn.Module) -> torch.dtype:
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') as a tuple of positive ints."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise ACNetError(f"bad --input-shape {text!r}: give positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def _check_device(device: str) -> str:
    """``device`` when this machine has it; ``ACNetError`` otherwise."""
    if device not in DEVICES:
        raise ACNetError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ACNetError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return device
