"""The ``acnet`` command line: inspect, convert, deploy, verify and export models.

Each command parses its options, calls the library and renders the result. A new command is a function
decorated with ``@app.command(...)`` and ``@guarded`` that takes the shared options below.
"""

import contextlib
import copy
import functools
import io
import json
import math
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from torch import nn

from . import __version__, checkpoint
from .convert import acify, deploy
from .demo import DEFAULT_EPOCHS, run_demo
from .errors import ACNetError, VerificationError
from .graph import Plan
from .roundtrip import load, original_state_dict, save_weights
from .spec import FORMS, ModelSpec
from .verify import Comparison, VerifyResult, verify

EXIT_MISMATCH, EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 success; 1 verification failed (outputs differ beyond --rtol); "
    "2 usage or input error (bad spec, file, weights or option); 3 unexpected error (rerun with --debug)."
)
DEFAULT_SHAPE = (1, 3, 224, 224)
DEFAULT_OPTIONS = {
    "include": None,
    "exclude": None,
    "init": "preserve",
    "gamma_init": 1.0,
    "min_kernel": 3,
    "max_kernel": None,
    "mode": "exact",
}

app = typer.Typer(
    name="acnet",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _option(*names: str, text: str, metavar: str | None = None) -> typer.models.OptionInfo:
    """A typer option whose default, if any, is described in its help text."""
    return typer.Option(*names, help=text, metavar=metavar, show_default=False)


Spec = Annotated[str, typer.Argument(help=f"The model: {FORMS}.", show_default=False)]
Args = Annotated[
    list[str] | None,
    _option("--arg", "-a", metavar="KEY=VALUE", text="Constructor argument (repeatable), e.g. --arg num_classes=10."),
]
TrainedWeights = Annotated[
    str, _option("--weights", "-w", metavar="FILE", text="The acified (trained) checkpoint: .safetensors or .pt.")
]
Include = Annotated[
    list[str] | None,
    _option(
        metavar="PATTERN", text="Convert only convs whose name matches (shell pattern, repeatable), e.g. 'layer4.*'."
    ),
]
Exclude = Annotated[
    list[str] | None,
    _option(metavar="PATTERN", text="Leave convs whose name matches as they are (shell pattern, repeatable)."),
]
MinKernel = Annotated[int | None, _option(text="Convert only kernels whose sides are at least this (default 3).")]
MaxKernel = Annotated[int | None, _option(text="Convert only kernels whose sides are at most this.")]
Mode = Annotated[
    str | None,
    _option(text="'exact' (the paper's block, absorbs the BatchNorm; default) or 'fast' (one conv per forward)."),
]
InputShape = Annotated[
    str | None,
    _option(
        metavar="N,C,H,W",
        text="Shape of the random inputs used for the checks (default: stored in the checkpoint, else 1,3,224,224).",
    ),
]
Rtol = Annotated[float, typer.Option(help="Largest accepted max|ref - out| / max(1, max|ref|).")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output files.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]


def _epilog(*examples: str, note: str = "") -> str:
    """Help text shown after the options: examples, one per paragraph, then a note."""
    return "\n\n".join(["Examples:", *(f"  {example}" for example in examples), *([note] if note else [])])


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """Turn errors into a one-line message on stderr and a documented exit code (a traceback with --debug)."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        debug = kwargs.get("debug", False)
        try:
            command(*args, **kwargs)
        except VerificationError as exc:
            _fail(str(exc), EXIT_MISMATCH, debug)
        except ACNetError as exc:
            _fail(str(exc), EXIT_INPUT, debug)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED, debug)
        except Exception as exc:
            _fail(f"unexpected {_first_line(exc)} (rerun with --debug for the traceback)", EXIT_UNEXPECTED, debug)

    return run


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


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
    """ACNet for any PyTorch model: train with Asymmetric Convolution Blocks, deploy as plain convs.

    SPEC is path/model.py[:NAME], package.module[:NAME], torchvision:NAME or timm:NAME (see docs/cli.md).
    """


@app.command(
    "inspect",
    epilog=_epilog(
        "acnet inspect torchvision:resnet18",
        "acnet inspect model.py:Net --arg width=64 --exclude 'stem.*'",
        "acnet inspect timm:resnet18d --json > sites.json",
    ),
)
@guarded
def inspect_command(
    spec: Spec,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: Annotated[
        str | None,
        _option(
            metavar="N,C,H,W",
            text="Shape of an example input, run only where torch.fx cannot trace the model (default 1,3,224,224).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")] = False,
    debug: Debug = False,
) -> None:
    """Show every conv of the model: converted or skipped (and why), the BatchNorm it absorbs, parameter counts."""
    options = _options({}, include=include, exclude=exclude, min_kernel=min_kernel, max_kernel=max_kernel, mode=mode)
    shape = parse_shape(input_shape) if input_shape else DEFAULT_SHAPE
    with _spinner(f"analysing {spec}"):
        original = ModelSpec(spec, tuple(arg or ())).build()
        counts = {"original": _parameters(original)}
        acified = _acify(original, options, shape, inplace=True)
        counts["training"] = _parameters(acified)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model with nothing converted is a valid thing to inspect
            counts["deployed"] = _parameters(deploy(acified, check=False))  # only counted: no weights leave inspect
    plan = acified.acnet_plan
    if as_json:
        report = {
            "spec": spec,
            "args": list(arg or ()),
            "summary": plan.summary(),
            "sites": [site.as_dict() for site in plan.sites],
            "trace_failures": plan.trace_failures,
            "parameters": counts,
        }
        typer.echo(json.dumps(report, indent=2))
        return
    _print_plan(plan, spec)
    sizes = ", ".join(f"{form} {count:,}" for form, count in counts.items())
    out.print(f"parameters: {sizes}", soft_wrap=True)


@app.command(
    "convert",
    epilog=_epilog(
        "acnet convert torchvision:resnet18 --out resnet18.acnet.safetensors",
        "acnet convert model.py --weights pretrained.pt --exclude 'head.*'",
        "acnet convert mypackage.models:build --arg num_classes=100 --init scratch --input-shape 1,3,32,32",
        note="The checkpoint is a plain state_dict of acify(model); train it in Python, then run acnet deploy.",
    ),
)
@guarded
def convert_command(
    spec: Spec,
    arg: Args = None,
    weights: Annotated[
        str | None, _option("--weights", "-w", metavar="FILE", text="Weights of the unconverted model to start from.")
    ] = None,
    out_file: Annotated[
        str | None,
        _option("--out", "-o", metavar="FILE", text="Output, .safetensors or .pt (default NAME.acnet.safetensors)."),
    ] = None,
    init: Annotated[str, typer.Option(help="New branches: 'preserve' (function unchanged) or 'scratch'.")] = "preserve",
    gamma_init: Annotated[float, typer.Option(help="BN gamma of every branch with --init scratch.")] = 1.0,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: Annotated[
        str | None,
        _option(
            "--input-shape",
            metavar="N,C,H,W",
            text="Shape of the random input used for the checks, stored for the later commands (default 1,3,224,224).",
        ),
    ] = None,
    rtol: Rtol = 1e-4,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Turn every eligible conv (with its BatchNorm) into an ACNet block (--mode) and write the training checkpoint."""
    model_spec = ModelSpec(spec, tuple(arg or ()))
    target = checkpoint.ensure_writable(out_file or f"{model_spec.stem}.acnet.safetensors", force=force)
    checkpoint.file_kind(target)
    shape = parse_shape(input_shape) if input_shape else DEFAULT_SHAPE
    options = _options(
        {},
        include=include,
        exclude=exclude,
        min_kernel=min_kernel,
        max_kernel=max_kernel,
        mode=mode,
        init=init,
        gamma_init=gamma_init,
    )
    with _spinner(f"converting {spec}"):
        original = model_spec.build()
        if weights:
            _load_original_weights(original, weights)
        acified = _acify(original, options, shape, inplace=False)
        x = _example(shape, acified)
        checks = []
        with _forward_errors(shape):
            if init == "preserve":
                checks.append(("acified vs original", verify(original, acified, x, rtol=rtol)))
            checks.append(("deployed vs acified", verify(acified, deploy(acified), x, rtol=rtol)))
        origin = {"spec": spec, "args": model_spec.args, "options": options, "input_shape": shape}
        save_weights(acified, target, "acified", force=force, origin=origin)
    _print_plan(acified.acnet_plan, spec)
    for label, result in checks:
        _print_check(label, result)
    out.print(f"wrote {target}", soft_wrap=True)


@app.command(
    "deploy",
    epilog=_epilog(
        "acnet deploy torchvision:resnet18 -w trained.safetensors --out resnet18.deployed.safetensors",
        "acnet deploy model.py -w trained.pt --out deployed.pt --format original",
        note="--format plain: converted convs have a bias and absorbed BatchNorms are gone; it loads into "
        "deploy(acify(model)). --format original: loads with strict=True into the unmodified model (each absorbed "
        "BatchNorm becomes an exact identity plus the fused bias), so deployment code needs nothing from "
        "acnet-convert.",
    ),
)
@guarded
def deploy_command(
    spec: Spec,
    weights: TrainedWeights,
    out_file: Annotated[str, _option("--out", "-o", metavar="FILE", text="Output checkpoint (.safetensors or .pt).")],
    fmt: Annotated[str, typer.Option("--format", help="'plain' or 'original' (see below).")] = "plain",
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    rtol: Rtol = 1e-4,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Fuse every ACNet block of a trained checkpoint into one conv and write the deployed weights, checked."""
    if fmt not in ("plain", "original"):
        raise ACNetError(f"unknown --format {fmt!r}: use plain or original")
    target = checkpoint.ensure_writable(out_file, force=force)
    checkpoint.file_kind(target)
    trained = _rebuild(spec, weights, arg, input_shape, include, exclude, min_kernel, max_kernel, mode)
    acified = trained.acified
    with _spinner("fusing and checking"):
        deployed = deploy(acified)
        x = _example(trained.shape, acified)
        with _forward_errors(trained.shape):
            checks = [("deployed vs acified", verify(acified, deployed, x, rtol=rtol))]
        if fmt == "original":
            fresh = trained.spec.build()
            state = original_state_dict(deployed)
            checkpoint.load_strict(fresh, state, source="the original-format weights", hint="report this as a bug")
            checks.append(("unmodified model with these weights vs acified", verify(acified, fresh, x, rtol=rtol)))
        origin = {"spec": spec, "args": trained.spec.args, "options": trained.options, "input_shape": trained.shape}
        save_weights(deployed, target, fmt, force=force, origin=origin)
    out.print(acified.acnet_plan.summary(), soft_wrap=True)
    for label, result in checks:
        _print_check(label, result)
    out.print(f"wrote {target} ({fmt})", soft_wrap=True)


@app.command(
    "verify",
    epilog=_epilog(
        "acnet verify torchvision:resnet18 -w trained.safetensors --input-shape 1,3,64,64",
        "acnet verify model.py -w trained.pt --deployed deployed.safetensors --samples 32",
        note=EXIT_CODES,
    ),
)
@guarded
def verify_command(
    spec: Spec,
    weights: TrainedWeights,
    deployed_file: Annotated[
        str | None,
        _option("--deployed", metavar="FILE", text="Also check this file written by acnet deploy (plain or original)."),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Number of random inputs.")] = 8,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    rtol: Rtol = 1e-4,
    debug: Debug = False,
) -> None:
    """Compare the trained acified model with its deployed form, layer by layer; exit 1 on a mismatch."""
    trained = _rebuild(spec, weights, arg, input_shape, include, exclude, min_kernel, max_kernel, mode)
    acified = trained.acified
    deployed = deploy(acified)
    shipped = _load_deployed(deployed_file, trained, deployed) if deployed_file else None
    rows: dict[str, Comparison] = {}
    with _forward_errors(trained.shape), _bar("comparing", samples) as advance:
        for seed in range(samples):
            x = _example(trained.shape, acified, seed)
            result = verify(acified, deployed, x, rtol=math.inf, layers=True)
            _keep_worst(rows, {**result.layers, "output (deployed in memory)": result})
            if shipped is not None:
                _keep_worst(rows, {f"output ({deployed_file})": verify(acified, shipped, x, rtol=math.inf)})
            advance()
    title = f"{spec}: deployed vs acified, worst of {samples} random input(s) of shape {_shape_text(trained.shape)}"
    table = Table(_folding("layer"), "max abs error", "max |ref|", "relative", "", box=box.SIMPLE, title=title)
    for name, c in rows.items():
        status = "ok" if c.relative <= rtol else "[bold red]MISMATCH[/]"
        table.add_row(name, f"{c.max_abs:.3g}", f"{c.max_ref:.3g}", f"{c.relative:.3g}", status)
    _print_table(table)
    failed = [name for name, c in rows.items() if c.relative > rtol]
    if failed:
        worst = max(failed, key=lambda name: rows[name].relative)
        raise VerificationError(
            f"{len(failed)} of {len(rows)} comparisons exceed rtol={rtol:g} (worst: {worst}, relative "
            f"{rows[worst].relative:.3g}): deploy the checkpoint again, and check it was saved from the acified model"
        )
    out.print(f"all {len(rows)} comparisons within rtol={rtol:g}", soft_wrap=True)


@app.command(
    "export",
    epilog=_epilog(
        "acnet export torchvision:resnet18 -w trained.safetensors --onnx resnet18.onnx --input-shape 1,3,224,224",
        "acnet export model.py -w trained.pt --onnx model.onnx --torchscript model.ts",
        note="ONNX needs the onnx extra: pip install 'acnet-convert\\[onnx]'. The graph has the fixed --input-shape.",
    ),
)
@guarded
def export_command(
    spec: Spec,
    weights: TrainedWeights,
    onnx_file: Annotated[
        str | None, _option("--onnx", metavar="FILE", text="Write the deployed model as ONNX, run with onnxruntime.")
    ] = None,
    torchscript_file: Annotated[
        str | None, _option("--torchscript", metavar="FILE", text="Write the deployed model as traced TorchScript.")
    ] = None,
    arg: Args = None,
    include: Include = None,
    exclude: Exclude = None,
    min_kernel: MinKernel = None,
    max_kernel: MaxKernel = None,
    mode: Mode = None,
    input_shape: InputShape = None,
    rtol: Rtol = 1e-4,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Export the deployed model to ONNX and/or TorchScript, each file checked against the acified model."""
    if not onnx_file and not torchscript_file:
        raise ACNetError("nothing to export: pass --onnx FILE and/or --torchscript FILE")
    for path in filter(None, (onnx_file, torchscript_file)):
        checkpoint.ensure_writable(path, force=force)
    if onnx_file:
        _require_onnx()
    trained = _rebuild(spec, weights, arg, input_shape, include, exclude, min_kernel, max_kernel, mode)
    acified = trained.acified
    deployed = deploy(acified)
    x = _example(trained.shape, acified)
    with _forward_errors(trained.shape):
        _print_check("deployed vs acified", verify(acified, deployed, x, rtol=rtol))
    if onnx_file:
        with checkpoint.atomic_output(onnx_file, force=force) as tmp:
            with _spinner(f"exporting {onnx_file}"):
                fallback = _export_onnx(deployed, x, tmp)
            if fallback:
                typer.echo(
                    f"warning: torch.export could not capture the model ({fallback}); the tracing exporter wrote "
                    f"{onnx_file}: it holds only the path the example input took through data-dependent code",
                    err=True,
                )
            with _spinner("checking with onnxruntime"):
                result = verify(acified, _OnnxRuntime(tmp), x, rtol=rtol)
        _print_check(f"onnxruntime ({onnx_file}) vs acified", result)
    if torchscript_file:
        with checkpoint.atomic_output(torchscript_file, force=force) as tmp:
            with _spinner(f"tracing {torchscript_file}"):
                result = verify(acified, _torchscript(deployed, x, tmp), x, rtol=rtol)
        _print_check(f"TorchScript ({torchscript_file}) vs acified", result)


@app.command(
    "demo",
    epilog=_epilog("acnet demo", "acnet demo --epochs 5 --out-dir /tmp --quiet", note=EXIT_CODES),
)
@guarded
def demo_command(
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs for each model.")] = DEFAULT_EPOCHS,
    seed: Annotated[int, typer.Option(help="Seed for the weights and the batch order.")] = 0,
    out_dir: Annotated[str, typer.Option(metavar="DIR", help="Where to write acnet-demo.png.")] = ".",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
    debug: Debug = False,
) -> None:
    """Train the paper's small CNN on 8x8 digits as baseline and ACNet, deploy it, prove the predictions equal."""
    if not run_demo(epochs=epochs, seed=seed, out_dir=out_dir, quiet=quiet).predictions_equal:
        raise typer.Exit(EXIT_MISMATCH)


@dataclass
class _Rebuilt:
    """A trained acified model rebuilt from its checkpoint, with what it was rebuilt from."""

    spec: ModelSpec
    options: dict
    shape: tuple[int, ...]
    acified: nn.Module


def _rebuild(spec, weights, arg, input_shape, include, exclude, min_kernel, max_kernel, mode) -> _Rebuilt:
    """Rebuild the acified model: by the plan the file records, else by acify with the options given or stored."""
    trained = checkpoint.read(weights)
    fmt = trained.get("format")
    if fmt in ("plain", "original"):
        raise ACNetError(f"{weights} is already deployed ({fmt}): pass the acified checkpoint, trained")
    stored_args = tuple(trained.get("args", ()))
    model_spec = ModelSpec(spec, tuple(arg) if arg else stored_args)
    if not arg and stored_args:
        typer.echo(f"note: using --arg {' '.join(stored_args)} stored in {weights} (written for {trained.get('spec')})",
                   err=True)  # fmt: skip
    given = {"include": include, "exclude": exclude, "min_kernel": min_kernel, "max_kernel": max_kernel, "mode": mode}
    if trained.plan is not None and any(value is not None for value in given.values()):
        flags = ", ".join(f"--{key.replace('_', '-')}" for key, value in given.items() if value is not None)
        typer.echo(f"warning: {flags} ignored: {weights} records the structure it was converted with", err=True)
    options = _options(trained.get("options") or {}, **given)
    shape = parse_shape(input_shape) if input_shape else tuple(trained.get("input_shape") or DEFAULT_SHAPE)
    with _spinner(f"rebuilding {spec}"):
        original = model_spec.build()
        original_keys = set(original.state_dict())
        if fmt is not None:
            acified = load(original, weights, inplace=True)
        else:
            acified = _acify(original, options, shape, inplace=True)
            if set(trained.state_dict) == original_keys:
                hint = "it holds weights of the unconverted model: run acnet convert --weights FILE first, then train"
            else:
                hint = (
                    "the file carries no acnet metadata: pass the --arg, --mode, --include, --exclude, --min-kernel, "
                    "--max-kernel and --input-shape values used with acnet convert"
                )
            checkpoint.load_strict(acified, trained.state_dict, source=weights, hint=hint)
    return _Rebuilt(model_spec, options, shape, acified.eval())


def _load_original_weights(model: nn.Module, path: str) -> None:
    start = checkpoint.read(path)
    if start.get("format") is not None:
        raise ACNetError(f"{path} was written by acnet ({start.get('format')}): pass weights of the unconverted model")
    hint = "pass weights of the unconverted model built from SPEC with the same --arg values"
    checkpoint.load_strict(model, start.state_dict, source=path, hint=hint)


def _load_deployed(path: str, trained: _Rebuilt, deployed: nn.Module) -> nn.Module:
    """The model a deployed checkpoint (plain or original layout) was written for, with its weights."""
    shipped = checkpoint.read(path)
    fmt = shipped.get("format")
    if fmt == "acified":
        raise ACNetError(f"{path} is an acified checkpoint: pass the file written by acnet deploy")
    if fmt is None:
        fmt = "plain" if set(shipped.state_dict) == set(deployed.state_dict()) else "original"
    model = copy.deepcopy(deployed) if fmt == "plain" else trained.spec.build()
    hint = "pass the file acnet deploy wrote for this SPEC and these weights"
    checkpoint.load_strict(model, shipped.state_dict, source=path, hint=hint)
    return model.eval()


def _options(stored: dict, **given) -> dict:
    """acify options: defaults, then those stored in a checkpoint, then those given on the command line."""
    return {**DEFAULT_OPTIONS, **stored, **{key: value for key, value in given.items() if value is not None}}


def _acify(model: nn.Module, options: dict, shape: tuple[int, ...], *, inplace: bool) -> nn.Module:
    """``acify`` with an example input of ``shape`` (for code torch.fx cannot trace); warnings become notes."""
    with warnings.catch_warnings(record=True) as caught, _forward_errors(shape):
        warnings.simplefilter("always")
        acified = acify(model, inplace=inplace, example_inputs=(_example(shape, model),), **options)
    for warning in caught:
        typer.echo(f"warning: {' '.join(str(warning.message).split())}", err=True)
    return acified


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') as a tuple of positive ints."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise ACNetError(f"bad --input-shape {text!r}: give positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def _example(shape: tuple[int, ...], model: nn.Module, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal input in the model's floating-point dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@contextlib.contextmanager
def _forward_errors(shape: tuple[int, ...]) -> Iterator[None]:
    """Report a model that fails on the example input as an input error naming --input-shape."""
    try:
        yield
    except ACNetError:
        raise
    except Exception as exc:
        raise ACNetError(
            f"the model failed on a random input of shape {_shape_text(shape)} ({_first_line(exc)}): "
            "pass --input-shape with the shape it expects, e.g. 1,3,224,224"
        ) from exc


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ACNetError(f"ONNX export needs {exc.name}: pip install 'acnet-convert[onnx]'") from exc


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    """Export with torch.export into one self-contained file, else with the tracing exporter (then say why)."""
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(path), input_names=["input"], dynamo=True, external_data=False)
        return ""
    except Exception as exc:
        reason = _first_line(exc)
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(path), input_names=["input"], dynamo=False)
    except Exception as exc:
        raise ACNetError(f"ONNX export failed ({_first_line(exc)}): acnet deploy --format plain still works") from exc
    return reason


def _torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    """Trace ``model`` on ``x``, save it to ``path`` and load it back."""
    try:
        with _quiet():
            torch.jit.save(torch.jit.trace(model, x), str(path))
            return torch.jit.load(str(path))
    except Exception as exc:
        raise ACNetError(f"TorchScript tracing failed ({_first_line(exc)}): try --onnx, or acnet deploy") from exc


class _OnnxRuntime(nn.Module):
    """An ONNX file run by onnxruntime on CPU, callable like the model it was exported from."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, *inputs: torch.Tensor):
        feed = {arg.name: x.numpy() for arg, x in zip(self.session.get_inputs(), inputs, strict=True)}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the progress prints, graph dumps and deprecation warnings of torch's exporters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _progress(*columns) -> Progress:
    """A transient progress display on stderr, shown only on a terminal."""
    return Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


@contextlib.contextmanager
def _spinner(description: str) -> Iterator[None]:
    with _progress(SpinnerColumn(), TextColumn("{task.description}")) as progress:
        progress.add_task(description, total=None)
        yield


@contextlib.contextmanager
def _bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    with _progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _keep_worst(rows: dict[str, Comparison], new: dict[str, Comparison]) -> None:
    """Keep, for each name, the comparison with the largest relative error."""
    for name, comparison in new.items():
        if name not in rows or comparison.relative > rows[name].relative:
            rows[name] = comparison


def _print_plan(plan: Plan, title: str) -> None:
    headers = ["kernel", "stride", "groups", _folding("branches"), _folding("absorbs BN"), "action", _folding("why")]
    table = Table(_folding("conv"), "type", *headers, box=box.SIMPLE, title=title)
    for s in plan.sites:
        shape = (_shape_text(s.kernel), _shape_text(s.stride), str(s.groups), s.layout or "-", s.bn or "-")
        table.add_row(s.name or "<root>", s.conv_type, *shape, s.action, s.reason)
    _print_table(table)
    out.print(plan.summary(), soft_wrap=True)
    for module, why in plan.trace_failures.items():
        typer.echo(f"warning: torch.fx could not trace {module or '<root>'} ({why})", err=True)


def _folding(header: str) -> Column:
    """A column of names: wrapped rather than cut short when the table is too wide."""
    return Column(header, overflow="fold")


def _print_table(table: Table) -> None:
    """Fit a terminal's width; in a file or pipe use up to 160 columns so that rows stay whole."""
    console = out if out.is_terminal else Console(highlight=False, width=max(out.width, 160))
    console.print(table)


def _print_check(label: str, result: VerifyResult) -> None:
    out.print(f"check {label}: max abs error {result.max_abs:.3g}, relative {result.relative:.3g}", soft_wrap=True)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


if __name__ == "__main__":
    app(prog_name="acnet")
