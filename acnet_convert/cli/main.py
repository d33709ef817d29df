"""The ``acnet`` command line: inspect, convert, deploy, verify, export and quantcheck models.

Each command parses its options, calls the library and renders the result: text on stdout, notes and warnings on
stderr, or one JSON document on stdout with ``--json``. A new command is a function decorated with
``@app.command(..., cls=_Command)`` and ``@guarded`` whose first parameter is the ``_Session`` it reports to.
torch is imported only inside commands, so that ``acnet --help`` and ``acnet --version`` answer at once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..errors import ACNetError, VerificationError
from ..files.spec import FORMS, ModelSpec

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..analysis import Plan
    from ..checks.verify import Comparison

EXIT_FAILED, EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 success; 1 a check failed (outputs differ beyond --rtol) or convert converted nothing; "
    "2 usage or input error (bad option, spec, file or weights); 3 unexpected error (rerun with --debug)."
)
BUILTIN_KINDS = ("acb", "dbb", "repvgg", "qarepvgg")  # the registry's built-in kinds, named here to keep torch out
DEFAULT_SHAPE = (1, 3, 224, 224)
DEMO_EPOCHS = 30  # acnet_convert.demo.DEFAULT_EPOCHS, named here to keep torch out
DEFAULT_OPTIONS = {
    "block": "acb",
    "include": None,
    "exclude": None,
    "init": "preserve",
    "gamma_init": 1 / 3,  # the library's default (registry.DEFAULT_GAMMA), named here to keep torch out
    "min_kernel": 3,
    "max_kernel": None,
    "mode": "exact",
}
STRUCTURE_FLAGS = ("block", "include", "exclude", "min_kernel", "max_kernel", "mode")


def _plain_flags(params: list) -> list:
    """Parameters with the type column of every on/off flag left empty (no ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """An acnet command: on/off flags show no value type in --help."""

    def get_params(self, ctx: click.Context) -> list:
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    """The acnet group: usage errors are one ``error: ... (try: ...)`` line and exit 2, like every other error."""

    def get_params(self, ctx: click.Context) -> list:
        return _plain_flags(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name or "acnet", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError:
            sys.exit(0)  # the help has been shown
        except click.exceptions.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "acnet"
            _error_line(f"{_usage_message(exc)} (try: {where} --help)")
            sys.exit(EXIT_INPUT)
        except click.exceptions.ClickException as exc:
            _error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: Exception) -> str:
    """click's message for a usage error, as one lower-case clause."""
    text = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")
    return text[:1].lower() + text[1:]


def _error_line(message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)


app = typer.Typer(
    name="acnet",
    cls=_Group,
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)


def _option(*names: str, text: str, metavar: str | None = None, **kwargs) -> typer.models.OptionInfo:
    """A typer option whose default, if any, is described in its help text."""
    return typer.Option(*names, help=text, metavar=metavar, show_default=False, **kwargs)


def _positive(value: float | None) -> float | None:
    """Reject zero, negative and non-finite numbers."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value:g} is not a positive number")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value:g} is not a finite number")
    return value


Spec = Annotated[str, typer.Argument(metavar="SPEC", help=f"The model: {FORMS}.", show_default=False)]
Args = Annotated[
    list[str] | None,
    _option("--arg", "-a", metavar="KEY=VALUE", text="Constructor argument (repeatable), e.g. --arg num_classes=10."),
]
TrainedWeights = Annotated[
    str, _option("--weights", "-w", metavar="FILE", text="The acified (trained) checkpoint: .safetensors or .pt.")
]
CheckpointKey = Annotated[
    str | None,
    _option(
        metavar="KEY",
        text="The entry of a .pt checkpoint that holds several state dicts to read, e.g. state_dict_ema.",
    ),
]
Block = Annotated[
    list[str] | None,
    _option(
        metavar="KIND|PATTERN=KIND",
        text=f"Block kind: {', '.join(BUILTIN_KINDS)} (default acb) or one the model file registers; repeat "
        "PATTERN=KIND for a kind per layer (first match wins, a bare KIND is the default).",
    ),
]
Include = Annotated[
    list[str] | None,
    _option(
        metavar="PATTERN",
        text="Convert only convs matched (repeatable): a shell pattern ('layer4.*') or a module name ('layer4', "
        "which matches it and everything under it).",
    ),
]
Exclude = Annotated[
    list[str] | None,
    _option(metavar="PATTERN", text="Leave convs matched as they are (repeatable): a shell pattern or a module name."),
]
MinKernel = Annotated[int | None, _option(min=1, text="Convert only kernels whose sides are at least this (default 3)")]
MaxKernel = Annotated[int | None, _option(min=1, text="Convert only kernels whose sides are at most this.")]
Mode = Annotated[
    Literal["exact", "fast"] | None,
    _option(text="exact: the paper's blocks, absorbing the BatchNorm (default); fast: one conv per forward."),
]
InputShape = Annotated[
    list[str] | None,
    _option(
        metavar="N,C,H,W",
        text="Shape of the random inputs for the checks, once per model input (default: stored in the checkpoint, "
        "else the shapes of --inputs, else 1,3,224,224).",
    ),
]
Inputs = Annotated[
    str | None,
    _option(metavar="FILE.pt", text="Real inputs for the checks: a tensor or tuple of tensors saved by torch.save."),
]
Device = Annotated[Literal["cpu", "cuda"], _option(text="Where the checks and example runs run (default cpu).")]
Rtol = Annotated[
    float, _option(callback=_positive, text="Largest accepted max|ref - out| / max(1, max|ref|) (default 1e-4).")
]
Force = Annotated[bool, _option("--force", "-f", text="Overwrite existing output files.")]
Json = Annotated[bool, _option("--json", text="Print one JSON document on stdout instead of text.")]
Quiet = Annotated[bool, _option("--quiet", "-q", text="Print nothing on success (warnings and errors go to stderr).")]
Debug = Annotated[bool, _option("--debug", text="Show the full traceback of an error.")]


def _epilog(*examples: str, note: str = "") -> str:
    """Help text shown after the options: examples, one per paragraph, then a note."""
    return "\n\n".join(["Examples:", *(f"  {example}" for example in examples), *([note] if note else [])])


# ---- what a command reports: text, notes, warnings, checks and files, or one JSON document ----


class NothingConverted(ACNetError):
    """convert found no conv to convert (exit 1 unless --allow-empty)."""


@dataclass
class _Session:
    """One command run: renders text unless --json or --quiet, and collects the JSON document."""

    command: str
    as_json: bool = False
    quiet: bool = False
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record = {"command": self.command, "ok": True, "files": [], "checks": [], "notes": [], "warnings": []}

    @property
    def out(self) -> Console:
        return Console(highlight=False, quiet=self.quiet or self.as_json)

    def say(self, text: str) -> None:
        """A line of the text output (stdout)."""
        self.out.print(text, soft_wrap=True, markup=False)

    def table(self, table: Table) -> None:
        """A table on stdout: a terminal's width, else up to 160 columns so that rows stay whole."""
        console = self.out
        console.width = console.width if console.is_terminal else max(console.width, 160)
        console.print(table)

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        if not self.quiet:
            typer.echo(f"note: {' '.join(text.split())}", err=True)

    def warn(self, text: str) -> None:
        self.record["warnings"].append(text)
        typer.echo(f"warning: {' '.join(text.split())}", err=True)

    def check(self, label: str, result: Comparison, rtol: float) -> None:
        """Record and show one comparison."""
        self.record["checks"].append(_check_record(label, result, rtol))
        verdict = "ok" if result.relative <= rtol else "MISMATCH"
        self.say(f"check {label}: max abs error {result.max_abs:.3g}, relative {result.relative:.3g} ({verdict})")

    def wrote(self, path: Path | str, what: str) -> None:
        self.record["files"].append({"path": str(path), "kind": what})
        self.say(f"wrote {path} ({what})")

    def finish(self) -> None:
        if self.as_json:
            typer.echo(json.dumps(_jsonable(self.record), indent=2))

    def fail(self, message: str, code: int) -> None:
        _error_line(message)
        if self.as_json:
            self.record.update(ok=False, error=" ".join(message.split()), exit_code=code)
            self.finish()


def _check_record(label: str, result: Comparison, rtol: float) -> dict:
    """One comparison as the JSON document lists it."""
    return {"label": label, "max_abs": result.max_abs, "max_ref": result.max_ref, "relative": result.relative,
            "rtol": rtol, "passed": result.relative <= rtol}  # fmt: skip


def _jsonable(value: object) -> object:
    """``value`` with tuples as lists, paths as strings and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Run a command with its ``_Session``; errors become one line on stderr and a documented exit code."""
    signature = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def run(**kwargs) -> None:
        session = _Session(command.__name__.removesuffix("_command"), kwargs.get("as_json", False),
                           kwargs.get("quiet", False))  # fmt: skip
        debug = kwargs.get("debug", False)
        try:
            command(session, **kwargs)
            session.finish()
            return
        except (VerificationError, NothingConverted) as exc:
            error, message, code = exc, str(exc), EXIT_FAILED
        except ACNetError as exc:
            error, message, code = exc, str(exc), EXIT_INPUT
        except KeyboardInterrupt as exc:
            error, message, code = exc, "interrupted", EXIT_INTERRUPTED
        except typer.Exit:
            raise
        except Exception as exc:
            error, code = exc, EXIT_UNEXPECTED
            message = f"unexpected {_first_line(exc)} (rerun with --debug for the traceback)"
        if debug:
            traceback.print_exception(error)
        session.fail(message, code)
        raise typer.Exit(code)

    run.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return run


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"acnet-convert {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """ACNet for any PyTorch model: train with re-parameterisable blocks, deploy as plain convs.

    SPEC is path/model.py[:NAME], package.module[:NAME], torchvision:NAME or timm:NAME (see docs/cli.md).
    """


# ---- commands ----


@app.command(
    "inspect",
    cls=_Command,
    epilog=_epilog(
        "acnet inspect torchvision:resnet18",
        "acnet inspect model.py:Net --arg width=64 --exclude stem --block 'layer4=dbb'",
        "acnet inspect timm:resnet18d --json > sites.json",
    ),
)
@guarded
def inspect_command(
    session: _Session,
    spec: Spec,
    arg: Args = None,
    block: Block = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: Annotated[
        list[str] | None,
        _option(
            metavar="N,C,H,W",
            text="Shape of an example input (once per model input), run only where torch.fx cannot trace the model "
            "(default 1,3,224,224).",
        ),
    ] = None,
    inputs: Inputs = None,
    device: Device = "cpu",
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Show every conv of the model: converted or skipped (and why), its block kind, the BatchNorm it absorbs."""
    from ..api import deploy

    model_spec = _model_spec(session, spec, arg)
    options = _options({}, block=_block_choice(block), include=include, exclude=exclude, min_kernel=min_kernel,
                       max_kernel=max_kernel, mode=mode)  # fmt: skip
    examples = _examples(input_shape, inputs, device)
    with _spinner(session, f"analysing {spec}"):
        _check_block(model_spec, options)
        original = model_spec.build().to(device)
        counts = {"original": _parameters(original)}
        acified = _acify(session, original, options, examples, inplace=True)
        counts["training"] = _parameters(acified)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model with nothing converted is a valid thing to inspect
            counts["deployed"] = _parameters(deploy(acified, check=False))  # only counted: no weights leave inspect
    _report_plan(session, acified.acnet_plan, spec)
    session.record["parameters"] = counts
    session.say(f"parameters: {', '.join(f'{form} {count:,}' for form, count in counts.items())}")


@app.command(
    "convert",
    cls=_Command,
    epilog=_epilog(
        "acnet convert torchvision:resnet18 --arg num_classes=10 --input-shape 1,3,32,32",
        "acnet convert model.py --weights pretrained.pt --exclude head --block 'layer4.*=dbb'",
        "acnet convert segnet.py --input-shape 2,3,64,64 --input-shape 2,1,64,64 --out seg.acnet.safetensors",
        note="The checkpoint is the acified model with the plan it was built by; train it in Python "
        "(acnet_convert.load rebuilds it), then run acnet deploy.",
    ),
)
@guarded
def convert_command(
    session: _Session,
    spec: Spec,
    arg: Args = None,
    weights: Annotated[
        str | None, _option("--weights", "-w", metavar="FILE", text="Weights of the unconverted model to start from.")
    ] = None,
    checkpoint_key: CheckpointKey = None,
    out_file: Annotated[
        str | None,
        _option("--out", "-o", metavar="FILE", text="Output, .safetensors or .pt (default NAME.acnet.safetensors)."),
    ] = None,
    block: Block = None,
    init: Annotated[
        Literal["preserve", "scratch"],
        _option(text="New branches: preserve (the function is unchanged; default) or scratch (as in the paper)."),
    ] = "preserve",
    gamma_init: Annotated[
        float, _option(callback=_finite, text="BN gamma of every branch with --init scratch (default 1/3).")
    ] = 1 / 3,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    inputs: Inputs = None,
    device: Device = "cpu",
    allow_empty: Annotated[
        bool, _option("--allow-empty", text="Write the checkpoint even when no conv is converted.")
    ] = False,
    rtol: Rtol = 1e-4,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Turn every eligible conv (with its BatchNorm) into a training block and write the checkpoint, checked."""
    from ..files import checkpoint
    from ..api import deploy
    from ..files.roundtrip import save_weights
    from ..checks.verify import verify

    model_spec = _model_spec(session, spec, arg)
    target = checkpoint.ensure_writable(out_file or f"{model_spec.stem}.acnet.safetensors", force=force)
    checkpoint.file_kind(target)
    options = _options({}, block=_block_choice(block), include=include, exclude=exclude, min_kernel=min_kernel,
                       max_kernel=max_kernel, mode=mode, init=init, gamma_init=gamma_init)  # fmt: skip
    examples = _examples(input_shape, inputs, device)
    with _spinner(session, f"converting {spec}"):
        _check_block(model_spec, options)
        original = model_spec.build()
        if weights:
            _load_original_weights(session, original, weights, checkpoint_key)
        original = original.to(device).eval()
        acified = _acify(session, original, options, examples, inplace=False)
    _report_plan(session, acified.acnet_plan, spec)
    if not acified.acnet_plan.converted and not allow_empty:
        raise NothingConverted(_nothing_converted(acified.acnet_plan))
    with _spinner(session, "checking"), examples.errors():
        x = examples.first(acified)
        if init == "preserve":
            session.check("acified vs original", verify(original, acified, *x, rtol=math.inf), rtol)
        session.check("deployed vs acified", verify(acified, deploy(acified), *x, rtol=math.inf), rtol)
    _raise_failed(session)
    origin = {"spec": spec, "args": model_spec.args, "options": options, **examples.recorded()}
    form = "acified" if acified.acnet_plan.converted else "plain"  # with --allow-empty: a model without blocks
    save_weights(acified, target, form, force=force, origin=origin)
    session.wrote(target, form)


@app.command(
    "deploy",
    cls=_Command,
    epilog=_epilog(
        "acnet deploy torchvision:resnet18 -w trained.safetensors --out resnet18.deployed.safetensors",
        "acnet deploy model.py -w trained.pt --out deployed.pt --format original",
        note="--format plain: converted convs have a bias and absorbed BatchNorms are gone; it loads into "
        "deploy(acify(model)). --format original: loads with strict=True into the unmodified model (each absorbed "
        "BatchNorm becomes an exact identity plus the fused bias), so deployment code needs nothing from "
        "acnet-convert. After writing, one line sums up how the deployed weights will quantise (acnet quantcheck "
        "for the details).",
    ),
)
@guarded
def deploy_command(
    session: _Session,
    spec: Spec,
    weights: TrainedWeights,
    out_file: Annotated[
        str | None,
        _option("--out", "-o", metavar="FILE", text="Output, .safetensors or .pt (default NAME.deployed.safetensors)."),
    ] = None,
    fmt: Annotated[
        Literal["plain", "original"],
        _option("--format", text="plain (default) or original: the layout of the weights written (see below)."),
    ] = "plain",
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    inputs: Inputs = None,
    device: Device = "cpu",
    rtol: Rtol = 1e-4,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fuse every block of a trained checkpoint into one conv and write the deployed weights, checked."""
    from ..files import checkpoint
    from ..api import deploy
    from ..files.roundtrip import original_state_dict, save_weights
    from ..checks.verify import verify

    given = _given(include, exclude, min_kernel, max_kernel, mode)
    loaded = _restore(session, spec, weights, checkpoint_key, arg, given, _examples(input_shape, inputs, device))
    target = checkpoint.ensure_writable(out_file or f"{loaded.spec.stem}.deployed.safetensors", force=force)
    checkpoint.file_kind(target)
    acified = loaded.require("acified", "pass the acified checkpoint, trained")
    with _spinner(session, "fusing and checking"), loaded.examples.errors():
        deployed = deploy(acified)
        x = loaded.examples.first(acified)
        session.check("deployed vs acified", verify(acified, deployed, *x, rtol=math.inf), rtol)
        if fmt == "original":
            fresh = loaded.spec.build().to(device)
            state = original_state_dict(deployed)
            checkpoint.load_strict(fresh, state, source="the original-format weights", hint="report this as a bug")
            session.check("unmodified model with these weights vs acified", verify(acified, fresh, *x, rtol=math.inf),
                          rtol)  # fmt: skip
    _raise_failed(session)
    session.record["summary"] = acified.acnet_plan.summary()
    session.say(acified.acnet_plan.summary())
    save_weights(deployed, target, fmt, force=force, origin=loaded.origin())
    session.wrote(target, fmt)
    _quant_summary(session, deployed)


@app.command(
    "verify",
    cls=_Command,
    epilog=_epilog(
        "acnet verify torchvision:resnet18 -w trained.safetensors --input-shape 1,3,64,64",
        "acnet verify model.py -w trained.pt --deployed deployed.safetensors --samples 32",
        "acnet verify model.py -w trained.pt --deployed model.onnx --inputs batch.pt",
        note=EXIT_CODES,
    ),
)
@guarded
def verify_command(
    session: _Session,
    spec: Spec,
    weights: TrainedWeights,
    deployed_file: Annotated[
        str | None,
        _option(
            "--deployed",
            metavar="FILE",
            text="Also check this file: weights written by acnet deploy, or an exported .onnx, .pt2 or TorchScript.",
        ),
    ] = None,
    samples: Annotated[int, _option(min=1, text="Number of random inputs (default 8).")] = 8,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    inputs: Inputs = None,
    device: Device = "cpu",
    rtol: Rtol = 1e-4,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compare the trained model with its deployed form, layer by layer, and with a shipped file (exit 1: differ)."""
    from ..api import deploy
    from ..checks.verify import verify

    given = _given(include, exclude, min_kernel, max_kernel, mode)
    loaded = _restore(session, spec, weights, checkpoint_key, arg, given, _examples(input_shape, inputs, device))
    reference = loaded.model
    deployed = deploy(reference) if loaded.form == "acified" else None
    if deployed is None and not deployed_file:
        raise ACNetError(f"{weights} holds the {loaded.form} model, which has nothing to fuse: pass --deployed FILE")
    shipped = _load_shipped(deployed_file, loaded, deployed) if deployed_file else None
    rows: dict[str, Comparison] = {}
    with loaded.examples.errors(), _bar(session, "comparing", samples) as advance:
        for x in loaded.examples.all(reference, samples):
            if deployed is not None:
                result = verify(reference, deployed, *x, rtol=math.inf, layers=True)
                _keep_worst(rows, {**result.layers, "output (deployed in memory)": result})
            if shipped is not None:
                _keep_worst(rows, {f"output ({deployed_file})": verify(reference, shipped, *x, rtol=math.inf)})
            advance()
    _report_rows(session, rows, spec, loaded, rtol)


@app.command(
    "export",
    cls=_Command,
    epilog=_epilog(
        "acnet export torchvision:resnet18 -w trained.safetensors --onnx resnet18.onnx --input-shape 2,3,224,224",
        "acnet export model.py -w trained.pt --pt2 model.pt2 --onnx model.onnx --opset 18",
        note="ONNX needs the onnx extra: pip install 'acnet-convert\\[onnx]'. The batch dimension is dynamic unless "
        "--static-shape; each file is run at the example batch size and at another one and compared with the "
        "deployed model. TorchScript is deprecated by PyTorch: prefer --pt2.",
    ),
)
@guarded
def export_command(
    session: _Session,
    spec: Spec,
    weights: TrainedWeights,
    onnx_file: Annotated[
        str | None, _option("--onnx", metavar="FILE", text="Write the deployed model as ONNX, run with onnxruntime.")
    ] = None,
    pt2_file: Annotated[
        str | None,
        _option("--pt2", metavar="FILE", text="Write the deployed model as a torch.export program (.pt2)."),
    ] = None,
    torchscript_file: Annotated[
        str | None,
        _option(
            "--torchscript", metavar="FILE", text="Write traced TorchScript (deprecated by PyTorch; prefer --pt2)."
        ),
    ] = None,
    opset: Annotated[int | None, _option(min=7, text="ONNX opset version (default: the exporter's).")] = None,
    static_shape: Annotated[
        bool, _option("--static-shape", text="Fix the batch size to the example's instead of leaving it dynamic.")
    ] = False,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    inputs: Inputs = None,
    device: Device = "cpu",
    rtol: Rtol = 1e-4,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export the deployed model to ONNX, .pt2 and/or TorchScript, each file checked against the deployed model."""
    from ..files import checkpoint
    from ..api import deploy
    from ..checks.verify import verify

    targets = {kind: path for kind, path in (("onnx", onnx_file), ("pt2", pt2_file),
                                              ("torchscript", torchscript_file)) if path}  # fmt: skip
    if not targets:
        raise ACNetError("nothing to export: pass --onnx FILE, --pt2 FILE and/or --torchscript FILE")
    for path in targets.values():
        checkpoint.ensure_writable(path, force=force)
    if onnx_file:
        from ..files.export import _require

        _require("onnx", "onnxruntime", "onnxscript")
    given = _given(include, exclude, min_kernel, max_kernel, mode)
    loaded = _restore(session, spec, weights, checkpoint_key, arg, given, _examples(input_shape, inputs, device))
    deployed = loaded.model
    if loaded.form == "acified":
        with _spinner(session, "fusing and checking"), loaded.examples.errors():
            deployed = deploy(loaded.model)
            x = loaded.examples.first(loaded.model)
            session.check("deployed vs acified", verify(loaded.model, deployed, *x, rtol=math.inf), rtol)
        _raise_failed(session)
    deployed = deployed.cpu().eval()
    for kind, path in targets.items():
        _export_one(session, kind, path, deployed, loaded.examples, opset, not static_shape, force, rtol)


@app.command(
    "quantcheck",
    cls=_Command,
    epilog=_epilog(
        "acnet quantcheck torchvision:resnet18 -w deployed.safetensors --input-shape 8,3,224,224",
        "acnet quantcheck model.py -w trained.safetensors --reference baseline.pt --inputs calibration.pt --json",
        note="Per layer: weight outliers, SQNR at 8 and 4 bits (per tensor and per channel), the output range on the "
        "inputs, and a flag with advice; then a static INT8 post-training quantisation of the whole model on the "
        "inputs (CPU), compared with the float model.",
    ),
)
@guarded
def quantcheck_command(
    session: _Session,
    spec: Spec,
    weights: Annotated[
        str, _option("--weights", "-w", metavar="FILE", text="Any checkpoint of the model: acified, deployed or plain.")
    ],
    reference: Annotated[
        str | None,
        _option(metavar="FILE", text="Weights of the unconverted model of the same spec, to compare each layer with."),
    ] = None,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    input_shape: InputShape = None,
    inputs: Inputs = None,
    no_ptq: Annotated[bool, _option("--no-ptq", text="Skip the INT8 post-training quantisation check.")] = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Report how well every conv and linear layer of the deployed model survives quantisation (INT8, INT4)."""
    from ..api import deploy
    from ..checks.quant import quant_report
    from ..files.roundtrip import load

    loaded = _restore(session, spec, weights, checkpoint_key, arg, {}, _examples(input_shape, inputs, "cpu"))
    model = deploy(loaded.model) if loaded.form == "acified" else loaded.model
    baseline = None
    if reference:
        baseline = load(loaded.spec.build(), reference)
        baseline = deploy(baseline) if _has_blocks(baseline) else baseline
    with _spinner(session, "measuring"), loaded.examples.errors():
        x = loaded.examples.first(model)
        report = quant_report(model, reference=baseline, inputs=x, ptq=not no_ptq)
    session.record.update(report.to_dict())
    rows = report.table()
    table = Table(*(_folding(header) for header in rows[0]), box=box.SIMPLE, title=f"{spec}: quantisation")
    for row in rows[1:]:
        table.add_row(*row)
    session.table(table)
    session.say(report.summary())


@app.command(
    "demo",
    cls=_Command,
    epilog=_epilog("acnet demo", "acnet demo --epochs 5 --out-dir /tmp --quiet", note=EXIT_CODES),
)
@guarded
def demo_command(
    session: _Session,
    epochs: Annotated[int, _option(min=1, text=f"Training epochs per model (default {DEMO_EPOCHS}).")] = DEMO_EPOCHS,
    seed: Annotated[int, _option(text="Seed for the weights and the batch order (default 0).")] = 0,
    out_dir: Annotated[str, _option(metavar="DIR", text="Where to write acnet-demo.png (default .).")] = ".",
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train the paper's small CNN on 8x8 digits as baseline and ACNet, deploy it, prove the predictions equal."""
    from ..demo.run import run_demo

    result = run_demo(epochs=epochs, seed=seed, out_dir=out_dir, quiet=quiet or as_json)
    figures = {key: value for key, value in asdict(result).items() if isinstance(value, (int, float))}
    session.record.update(figures, predictions_equal=result.predictions_equal)
    if result.plot:
        session.record["files"].append({"path": str(result.plot), "kind": "plot"})
    if not result.predictions_equal:
        raise VerificationError("the deployed model predicts differently from the trained one: report this as a bug")


# ---- building and restoring models ----


@dataclass
class _Examples:
    """The inputs of the checks and example runs: random ones of given shapes, real ones from a file, or both."""

    shapes: list[tuple[int, ...]] | None  # given with --input-shape; None: stored, else from --inputs, else default
    real: tuple | None
    source: str | None  # the file the real inputs come from
    device: str
    defaulted: bool = False  # the shapes are the default, chosen by nobody

    def settle(self, stored: list[tuple[int, ...]] | None) -> None:
        """Fix the random inputs' shapes: given, else stored in the checkpoint, else those of --inputs, else default."""
        if self.shapes is None:
            self.shapes = stored or ([tuple(x.shape) for x in self.real] if self.real else None)
            self.shapes, self.defaulted = self.shapes or [DEFAULT_SHAPE], not self.shapes

    def random(self, model: nn.Module, seed: int = 0, batch: int | None = None) -> tuple[Tensor, ...]:
        """Standard-normal inputs in the model's floating-point dtype, on the device."""
        from ..files.inputs import at_batch, random_inputs

        self.settle(None)
        shapes = at_batch(self.shapes, batch) if batch else self.shapes
        return random_inputs(shapes, _dtype(model), self.device, seed)

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

    def batch(self) -> int:
        """The batch size of the example inputs (their first dimension)."""
        self.settle(None)
        return int(self.real[0].shape[0]) if self.real else self.shapes[0][0]

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
                f"the model failed on {what} ({_first_line(exc)}): pass --input-shape with the shape it expects "
                "(once per input, e.g. 1,3,224,224), or --inputs FILE.pt"
            ) from exc


def _examples(input_shape: list[str] | None, inputs: str | None, device: str) -> _Examples:
    from ..files.inputs import check_device, load_inputs, parse_shape

    check_device(device)
    shapes = [parse_shape(text) for text in input_shape] if input_shape else None
    return _Examples(shapes, load_inputs(inputs) if inputs else None, inputs, device)


@dataclass
class _Loaded:
    """A model rebuilt from a checkpoint, with the form it is in and what it was rebuilt from."""

    spec: ModelSpec
    options: dict
    examples: _Examples
    model: nn.Module
    form: str  # "acified", "plain" or "original"
    path: str

    def require(self, form: str, fix: str) -> nn.Module:
        if self.form != form:
            raise ACNetError(f"{self.path} holds the {self.form} model, not the {form} one: {fix}")
        return self.model

    def origin(self) -> dict:
        """What the command line records in the files it writes from this model."""
        return {"spec": self.spec.text, "args": self.spec.args, "options": self.options, **self.examples.recorded()}


def _restore(session, spec, weights, key, arg, given, examples) -> _Loaded:
    """Rebuild the model a checkpoint holds: by the plan it records, else by acify with the options given or stored."""
    from ..files import checkpoint
    from ..api import apply_plan, deploy
    from ..files.roundtrip import load

    ckpt = checkpoint.read(weights, key)
    _note_entries(session, weights, ckpt, key)
    fmt = ckpt.get("format")
    model_spec = _stored_spec(session, spec, arg, ckpt, weights)
    if ckpt.plan is not None and any(value is not None for value in given.values()):
        flags = ", ".join(f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None)
        session.warn(f"{flags} ignored: {weights} records the structure it was converted with")
    options = _options(ckpt.get("options") or {}, **given)
    stored = ckpt.get("input_shapes") or ([ckpt.get("input_shape")] if ckpt.get("input_shape") else None)
    examples.settle([tuple(shape) for shape in stored] if stored else None)
    with _spinner(session, f"rebuilding {spec}"):
        original = model_spec.build()
        if fmt is not None and key is None:
            model = load(original, weights, inplace=True)
        elif ckpt.plan is not None and fmt in ("acified", "plain"):
            model = apply_plan(original, ckpt.plan)
            model = deploy(model, inplace=True, check=False) if fmt == "plain" else model
            checkpoint.load_strict(model, ckpt.state_dict, source=weights, hint=f"it was written for {spec}")
        elif set(ckpt.state_dict) == set(original.state_dict()):
            model, fmt = original, "original"
            checkpoint.load_strict(model, ckpt.state_dict, source=weights, hint="report this as a bug")
        else:
            model, fmt = _acify(session, original.to(examples.device), options, examples, inplace=True), "acified"
            hint = (
                "the file carries no acnet metadata: pass the --arg, --block, --mode, --include, --exclude, "
                "--min-kernel, --max-kernel and --input-shape values used with acnet convert"
            )
            checkpoint.load_strict(model, ckpt.state_dict, source=weights, hint=hint)
    if fmt == "acified" and not _has_blocks(model):
        fmt = "plain"
    return _Loaded(model_spec, options, examples, model.to(examples.device).eval(), fmt, weights)


def _note_entries(session: _Session, path: str, ckpt, key: str | None) -> None:
    """Say which entry of a file with several state dicts was read, and how to choose another."""
    others = [entry for entry in ckpt.entries if entry != ckpt.key]
    if key is None and ckpt.key and others:
        session.note(f"read {ckpt.key!r} of {path}, which also holds {', '.join(others)}: choose with --checkpoint-key")


def _stored_spec(session: _Session, spec: str, arg: list[str] | None, ckpt, path: str) -> ModelSpec:
    """The spec with the --arg values given, else those stored in the checkpoint (and a note saying so)."""
    stored = tuple(ckpt.get("args") or ())
    if not arg and stored:
        written_for = ckpt.get("spec")
        other = f", not {spec}" if written_for and written_for != spec else ""
        session.note(f"using --arg {' '.join(stored)} stored in {path} (written for {written_for}{other})")
    return _model_spec(session, spec, arg or list(stored))


def _model_spec(session: _Session, spec: str, arg: list[str] | None) -> ModelSpec:
    model_spec = ModelSpec(spec, tuple(arg or ()))
    model_spec.kwargs  # parse the --arg values before anything slow  # noqa: B018
    session.record.update(spec=spec, args=list(model_spec.args))
    return model_spec


def _given(include, exclude, min_kernel, max_kernel, mode) -> dict:
    """The structure options given on the command line (None: not given)."""
    return {"include": include, "exclude": exclude, "min_kernel": min_kernel, "max_kernel": max_kernel, "mode": mode}


def _options(stored: dict, **given) -> dict:
    """acify options: defaults, then those stored in a checkpoint, then those given on the command line."""
    return {**DEFAULT_OPTIONS, **stored, **{key: value for key, value in given.items() if value is not None}}


def _block_choice(values: list[str] | None) -> str | dict[str, str] | None:
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


def _check_block(model_spec: ModelSpec, options: dict) -> None:
    """Every kind --block names is registered, once the spec's module (which may register its own) is imported."""
    from ..blocks import kinds

    model_spec.factory  # imports the model's module  # noqa: B018
    block = options["block"]
    for kind in [block] if isinstance(block, str) else block.values():
        if kind not in kinds():
            raise ACNetError(
                f"unknown block kind {kind!r} in --block: the registered kinds are {', '.join(kinds())} (a model "
                "file adds its own with acnet_convert.register_block)"
            )


def _acify(session: _Session, model: nn.Module, options: dict, examples: _Examples, *, inplace: bool) -> nn.Module:
    """``acify`` with the example inputs (for code torch.fx cannot trace); its warnings become warning lines."""
    from ..api import acify

    with warnings.catch_warnings(record=True) as caught, examples.errors():
        warnings.simplefilter("always")
        acified = acify(model, inplace=inplace, example_inputs=examples.first(model), **options)
    for warning in caught:
        session.warn(str(warning.message))
    return acified


def _load_original_weights(session: _Session, model: nn.Module, path: str, key: str | None) -> None:
    from ..files import checkpoint

    start = checkpoint.read(path, key)
    _note_entries(session, path, start, key)
    if start.get("format") is not None:
        raise ACNetError(f"{path} was written by acnet ({start.get('format')}): pass weights of the unconverted model")
    hint = "pass weights of the unconverted model built from SPEC with the same --arg values"
    checkpoint.load_strict(model, start.state_dict, source=path, hint=hint)


def _load_shipped(path: str, loaded: _Loaded, deployed: nn.Module | None) -> nn.Module:
    """The model a shipped file holds: an exported artifact, or deployed weights (plain or original layout)."""
    from ..files import checkpoint
    from ..files.export import artifact_kind, load_artifact

    if Path(path).is_file() and artifact_kind(path):
        return load_artifact(path, device=loaded.examples.device)
    shipped = checkpoint.read(path)
    fmt = shipped.get("format")
    if fmt == "acified":
        raise ACNetError(f"{path} is an acified checkpoint: pass the file written by acnet deploy, or an exported one")
    if fmt is None:
        fmt = "plain" if deployed is not None and set(shipped.state_dict) == set(deployed.state_dict()) else "original"
    if fmt == "plain" and deployed is None:
        raise ACNetError(f"{path} holds plain deployed weights: pass the acified checkpoint as --weights")
    model = copy.deepcopy(deployed) if fmt == "plain" else loaded.spec.build()
    hint = "pass the file acnet deploy wrote for this SPEC and these weights"
    checkpoint.load_strict(model, shipped.state_dict, source=path, hint=hint)
    return model.to(loaded.examples.device).eval()


def _export_one(session, kind, path, deployed, examples, opset, dynamic, force, rtol) -> None:
    """Export ``deployed`` as ``kind`` to ``path`` atomically, checked at the example batch size and another."""
    from ..files import checkpoint
    from ..files.export import export_onnx, export_pt2, export_torchscript, load_artifact
    from ..checks.verify import verify

    cpu = _Examples(examples.shapes, examples.real, examples.source, "cpu")
    x = cpu.first(deployed)
    batch = cpu.batch()
    traced = x if not dynamic or batch > 1 else tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in x)
    label = {"onnx": "onnxruntime", "pt2": "torch.export", "torchscript": "TorchScript"}[kind]
    with checkpoint.atomic_output(path, force=force) as tmp, cpu.errors():
        with _spinner(session, f"exporting {path}"):
            if kind == "onnx":
                exported = export_onnx(deployed, traced, tmp, opset=opset, dynamic=dynamic)
            elif kind == "pt2":
                exported = export_pt2(deployed, traced, tmp, dynamic=dynamic)
            else:
                exported = export_torchscript(deployed, traced, tmp)
        if exported.fallback:
            session.warn(
                f"torch.export could not capture the model ({exported.fallback}); the tracing exporter wrote {path}: "
                "it holds only the path the example input took through data-dependent code"
            )
        artifact = load_artifact(tmp, kind=kind)
        other = 1 if batch > 1 else 3
        # A traced file holds the example's path through data-dependent code: other inputs may take another one.
        runs = [(batch, x)] + ([(other, cpu.random(deployed, 1, other))] if dynamic and not exported.fallback else [])
        for size, inputs in runs:
            session.check(f"{label} ({path}) vs deployed at batch {size}", verify(deployed, artifact, *inputs,
                                                                                   rtol=math.inf), rtol)  # fmt: skip
        _raise_failed(session)
    entry = {
        "path": str(path), "kind": kind, "inputs": exported.input_names, "outputs": exported.output_names,
        "dynamic_batch": dynamic, "opset": exported.opset, "tracing_fallback": bool(exported.fallback),
    }  # fmt: skip
    session.record["files"].append(entry)
    sizes = " and ".join(str(size) for size, _ in runs)
    opset_text = f", opset {exported.opset}" if exported.opset else ""
    session.say(
        f"wrote {path} ({kind}{opset_text}; inputs {', '.join(exported.input_names)}; outputs "
        f"{', '.join(exported.output_names)}; batch {'dynamic' if dynamic else 'fixed'}): equals the deployed model "
        f"within rtol={rtol:g} at batch size {sizes}"
    )


def _quant_summary(session: _Session, deployed: nn.Module) -> None:
    """One line on how the deployed weights will quantise."""
    from ..checks.quant import quant_report

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = quant_report(deployed, ptq=False).summary()
    except ACNetError as exc:
        session.note(f"no quantisation summary: {exc}")
        return
    session.record["quant_summary"] = summary
    session.say(f"quantisation: {summary} (details: acnet quantcheck)")


# ---- rendering ----


def _report_plan(session: _Session, plan: Plan, title: str) -> None:
    """The per-site decisions: a table, or the JSON record's sites (each with its reason's stable code)."""
    session.record.update(
        summary=plan.summary(),
        sites=[{**site.as_dict(), "code": site.code, "codes": site.codes}
               for site in plan.sites],  # fmt: skip
        trace_failures=dict(plan.trace_failures),
    )
    headers = ["kernel", "stride", "groups", "kind", _folding("branches"), _folding("absorbs BN"), "action"]
    table = Table(_folding("conv"), "type", *headers, _folding("why"), box=box.SIMPLE, title=title)
    for s in plan.sites:
        kind = f"{s.kind} {s.mode}" if s.kind else "-"
        shape = (_shape_text(s.kernel), _shape_text(s.stride), str(s.groups), kind, s.branches or "-", s.bn or "-")
        table.add_row(s.name or "<root>", s.conv_type, *shape, s.action, s.reason)
    session.table(table)
    session.say(plan.summary())
    for module, why in plan.trace_failures.items():
        session.warn(f"torch.fx could not trace {module or '<root>'} ({why})")


def _nothing_converted(plan: Plan) -> str:
    """Why no conv was converted: the count of each reason, and what to change."""
    if not plan.sites:
        return "the model has no Conv2d, Conv3d or ConvTranspose2d to convert: check the spec"
    reasons = Counter(site.reason for site in plan.sites if site.action == "skip")
    listing = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    return (
        f"no conv was converted ({len(plan.sites)} conv sites: {listing}): change --include, --exclude, --block or "
        "--min-kernel/--max-kernel, or pass --allow-empty to write the checkpoint anyway"
    )


def _report_rows(session: _Session, rows: dict[str, Comparison], spec: str, loaded: _Loaded, rtol: float) -> None:
    """The worst error of every layer and output, as a table and as checks; ``VerificationError`` on a mismatch."""
    from ..files.inputs import shape_text

    real = f" and the inputs from {loaded.examples.source}" if loaded.examples.real else ""
    title = f"{spec}: worst over random inputs of shape {shape_text(loaded.examples.shapes)}{real}"
    table = Table(_folding("layer"), "max abs error", "max |ref|", "relative", "", box=box.SIMPLE, title=title)
    for name, c in rows.items():
        status = "ok" if c.relative <= rtol else "[bold red]MISMATCH[/]"
        table.add_row(name, f"{c.max_abs:.3g}", f"{c.max_ref:.3g}", f"{c.relative:.3g}", status)
        session.record["checks"].append(_check_record(name, c, rtol))
    session.table(table)
    failed = [name for name, c in rows.items() if c.relative > rtol]
    if failed:
        worst = max(failed, key=lambda name: rows[name].relative)
        raise VerificationError(
            f"{len(failed)} of {len(rows)} comparisons exceed rtol={rtol:g} (worst: {worst}, relative "
            f"{rows[worst].relative:.3g}): deploy or export the checkpoint again, and check it was saved from the "
            "trained model"
        )
    session.say(f"all {len(rows)} comparisons within rtol={rtol:g}")


def _raise_failed(session: _Session) -> None:
    """``VerificationError`` naming the first recorded check that exceeds its tolerance."""
    failed = [check for check in session.record["checks"] if not check["passed"]]
    if failed:
        first = failed[0]
        raise VerificationError(
            f"check {first['label']} failed: max abs error {first['max_abs']:.3g}, relative {first['relative']:.3g} "
            f"exceeds rtol={first['rtol']:g}; did the model change after deploy, or is it not deterministic in eval?"
        )


def _keep_worst(rows: dict[str, Comparison], new: dict[str, Comparison]) -> None:
    """Keep, for each name, the comparison with the largest relative error."""
    for name, comparison in new.items():
        if name not in rows or comparison.relative > rows[name].relative:
            rows[name] = comparison


def _progress(session: _Session, *columns):
    """A transient progress display on stderr, shown only on a terminal and without --quiet."""
    from rich.progress import Progress, TimeElapsedColumn

    disable = session.quiet or not err.is_terminal
    return Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=disable)


@contextlib.contextmanager
def _spinner(session: _Session, description: str) -> Iterator[None]:
    from rich.progress import SpinnerColumn, TextColumn

    with _progress(session, SpinnerColumn(), TextColumn("{task.description}")) as progress:
        progress.add_task(description, total=None)
        yield


@contextlib.contextmanager
def _bar(session: _Session, description: str, total: int) -> Iterator[Callable[[], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with _progress(session, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _folding(header: str) -> Column:
    """A column of names: wrapped rather than cut short when the table is too wide."""
    return Column(header, overflow="fold")


def _dtype(model: nn.Module):
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _has_blocks(model: nn.Module) -> bool:
    from ..blocks import is_block

    return any(is_block(m) for m in model.modules())


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__

