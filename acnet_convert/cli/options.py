"""The options of the acnet commands: one typed alias per option, the bundles several commands share, acify options.

A bundle is a dataclass of options; a command parameter typed with one receives it filled in, and --help lists its
options where the parameter stands.  Choices and defaults come from ``acnet_convert.constants`` (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import typer

from ..constants import (
    BUILTIN_KINDS,
    DEFAULT_GAMMA,
    DEFAULT_KIND,
    DEFAULT_MIN_KERNEL,
    DEVICES,
    FILE_FORMATS,
    INITS,
    MODES,
)  # fmt: skip
from ..errors import ACNetError
from .spec import FORMS


def option(*names: str, text: str, metavar: str | None = None, **kwargs) -> typer.models.OptionInfo:
    """A typer option whose default, if any, is described in its help text."""
    return typer.Option(*names, help=text, metavar=metavar, show_default=False, **kwargs)


def positive(value: float | None) -> float | None:
    """Reject zero, negative and non-finite numbers."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value:g} is not a positive number")
    return value


def finite(value: float | None) -> float | None:
    """Reject non-finite numbers."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value:g} is not a finite number")
    return value


Spec = Annotated[str, typer.Argument(metavar="SPEC", help=f"The model: {FORMS}.", show_default=False)]
Args = Annotated[
    list[str] | None,
    option("--arg", "-a", metavar="KEY=VALUE", text="Constructor argument (repeatable), e.g. --arg num_classes=10."),
]
TrainedWeights = Annotated[
    str, option("--weights", "-w", metavar="FILE", text="The acified (trained) checkpoint: .safetensors or .pt.")
]
CheckpointKey = Annotated[
    str | None,
    option(
        metavar="KEY",
        text="The entry of a .pt checkpoint that holds several state dicts to read, e.g. state_dict_ema.",
    ),
]
Block = Annotated[
    list[str] | None,
    option(
        metavar="KIND|PATTERN=KIND",
        text=f"Block kind: {', '.join(BUILTIN_KINDS)} (default {DEFAULT_KIND}) or one the model file registers; "
        "repeat PATTERN=KIND for a kind per layer (first match wins, a bare KIND is the default).",
    ),
]
BlockOption = Annotated[
    list[str] | None,
    option(
        metavar="KIND.NAME=VALUE",
        text="An option of a block kind that has some (repeatable), e.g. --block-option mobileone.k=2.",
    ),
]
Init = Annotated[
    Literal[INITS],
    option(text="New branches: preserve (the function is unchanged; default) or scratch (as in the paper)."),
]
GammaInit = Annotated[
    float, option(callback=finite, text="BN gamma of every branch with --init scratch (default 1/3).")
]
Include = Annotated[
    list[str] | None,
    option(
        metavar="PATTERN",
        text="Convert only convs matched (repeatable): a shell pattern ('layer4.*') or a module name ('layer4', "
        "which matches it and everything under it).",
    ),
]
Exclude = Annotated[
    list[str] | None,
    option(metavar="PATTERN", text="Leave convs matched as they are (repeatable): a shell pattern or a module name."),
]
MinKernel = Annotated[
    int | None,
    option(min=1, text=f"Convert only kernels whose sides are at least this (default {DEFAULT_MIN_KERNEL})"),
]
MaxKernel = Annotated[int | None, option(min=1, text="Convert only kernels whose sides are at most this.")]
Mode = Annotated[
    Literal[MODES] | None,
    option(text="exact: the paper's blocks, absorbing the BatchNorm (default); fast: one conv per forward; "
           "repopt: the convs stay plain, their gradients preconditioned (exact under SGD)."),
]
DeployedFormat = Annotated[
    Literal[tuple(form for form in FILE_FORMATS if form != "acified")],  # the formats of deployed weights
    option("--format", text="plain (default) or original: the form of the weights written (see below)."),
]
InputShape = Annotated[
    list[str] | None,
    option(
        metavar="N,C,H,W",
        text="Shape of the random inputs for the checks, once per model input (default: stored in the checkpoint, "
        "else the shapes of --inputs, else 1,3,224,224).",
    ),
]
ExampleShape = Annotated[
    list[str] | None,
    option(
        metavar="N,C,H,W",
        text="Shape of an example input (once per model input), run only where torch.fx cannot trace the model "
        "(default 1,3,224,224).",
    ),
]
InputsFile = Annotated[
    str | None,
    option(metavar="FILE.pt", text="Real inputs for the checks: a tensor or tuple of tensors saved by torch.save."),
]
Device = Annotated[Literal[DEVICES], option(text="Where the checks and example runs run (default cpu).")]
Rtol = Annotated[
    float, option(callback=positive, text="Largest accepted max|ref - out| / max(1, max|ref|) (default 1e-4).")
]
Force = Annotated[bool, option("--force", "-f", text="Overwrite existing output files.")]
Json = Annotated[bool, option("--json", text="Print one JSON document on stdout instead of text.")]
Quiet = Annotated[bool, option("--quiet", "-q", text="Print nothing on success (warnings and errors go to stderr).")]
Debug = Annotated[bool, option("--debug", text="Show the full traceback of an error.")]


@dataclass
class Output:
    """How a command reports (every command has these, last)."""

    as_json: Json = False
    quiet: Quiet = False
    debug: Debug = False


@dataclass
class Structure:
    """Which convs to convert; None: not given (the checkpoint's, else the default)."""

    include: Include = None
    exclude: Exclude = None
    min_kernel: MinKernel = None
    max_kernel: MaxKernel = None
    mode: Mode = None

    def given(self) -> dict[str, object]:
        """The options given on the command line, by acify's argument names."""
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass
class InputOptions:
    """The inputs of the checks: random ones of given shapes and/or real ones from a file, on the CPU."""

    input_shape: InputShape = None
    inputs: InputsFile = None
    device: ClassVar[str] = "cpu"


@dataclass
class CheckInputs(InputOptions):
    """The inputs of the checks, on the device chosen."""

    device: Device = "cpu"


@dataclass
class ExampleInputs(CheckInputs):
    """The example inputs of a model torch.fx cannot trace, on the device chosen."""

    input_shape: ExampleShape = None


def flag(name: str) -> str:
    """The command-line flag of an acify argument or option field: ``min_kernel`` -> ``--min-kernel``."""
    return f"--{name.replace('_', '-')}"


def acify_options(
    stored: dict, *, block: str | dict[str, str] | None = None, init: str | None = None,
    gamma_init: float | None = None, structure: Structure | None = None, block_options: dict | None = None,
) -> dict[str, object]:  # fmt: skip
    """acify's options: the defaults, then those stored in a checkpoint, then those given on the command line."""
    defaults = {"block": DEFAULT_KIND, "include": None, "exclude": None, "init": INITS[0], "gamma_init": DEFAULT_GAMMA,
                "min_kernel": DEFAULT_MIN_KERNEL, "max_kernel": None, "mode": MODES[0]}  # fmt: skip
    given = {"block": block, "init": init, "gamma_init": gamma_init, "block_options": block_options,
             **(structure.given() if structure else {})}  # fmt: skip
    return {**defaults, **stored, **{name: value for name, value in given.items() if value is not None}}


def block_choice(values: list[str] | None) -> str | dict[str, str] | None:
    """--block values as acify's ``block``: one kind, or pattern -> kind with ``*`` last for a bare default kind."""
    if not values:
        return None
    bare = [value.strip() for value in values if "=" not in value]
    pairs = [tuple(part.strip() for part in value.split("=", 1)) for value in values if "=" in value]
    if len(bare) > 1:
        raise ACNetError(f"--block names several default kinds ({', '.join(bare)}): give one, and PATTERN=KIND pairs")
    if any(not part for pair in pairs for part in pair) or any(not kind for kind in bare):
        raise ACNetError("empty --block value: write --block KIND or --block PATTERN=KIND, e.g. --block 'layer4.*=dbb'")
    if not pairs:
        return bare[0]
    return {**dict(pairs), **({"*": bare[0]} if bare else {})}


def block_options(values: list[str] | None) -> dict[str, dict[str, int | str]] | None:
    """--block-option values as acify's ``block_options``: ``KIND.NAME=VALUE`` -> {kind: {name: value}}."""
    if not values:
        return None
    options: dict[str, dict[str, int | str]] = {}
    for value in values:
        target, _, text = (part.strip() for part in value.partition("="))
        kind, _, name = (part.strip() for part in target.partition("."))
        if not (kind and name and text):
            raise ACNetError(f"--block-option {value!r}: write KIND.NAME=VALUE, e.g. --block-option mobileone.k=2")
        options.setdefault(kind, {})[name] = int(text) if text.lstrip("-").isdigit() else text
    return options
