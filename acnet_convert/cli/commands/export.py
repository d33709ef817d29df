"""``acnet export``: the deployed model written as ONNX, .pt2 and/or TorchScript, each file checked against it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from ...errors import ACNetError
from ..examples import Examples
from ..framework import as_flags, epilog
from ..options import Args, CheckInputs, CheckpointKey, Force, Rtol, Spec, Structure, TrainedWeights, option
from ..render import raise_failed
from ..restore import restore
from ..session import Session

if TYPE_CHECKING:
    from ...files.export import Exported

EPILOG = epilog(
    "acnet export torchvision:resnet18 -w trained.safetensors --onnx resnet18.onnx --input-shape 2,3,224,224",
    "acnet export model.py -w trained.pt --pt2 model.pt2 --onnx model.onnx --opset 18",
    note="ONNX needs the onnx extra: pip install 'acnet-convert\\[onnx]'. The batch dimension is dynamic unless "
    "--static-shape; each file is run on the example, the example negated and random inputs at another batch size, "
    "and compared with the deployed model; all files are written or none. A traced file (TorchScript, or ONNX when "
    "torch.export cannot capture the model) holds only the path the example took: it is refused where the plan has "
    "convs decided by the example run, unless --allow-traced. TorchScript is deprecated by PyTorch: prefer --pt2.",
)
# The library's advice, as flags: its errors name Python functions and arguments.
FLAGS = {
    "use export_onnx": "export --onnx", "export_torchscript": "--torchscript", "export_pt2": "--pt2",
    "export_onnx": "--onnx", 'save_weights(model, path, "plain")': "acnet deploy --format plain",
    "allow_traced=True": "--allow-traced",
}  # fmt: skip


def main(
    session: Session,
    spec: Spec,
    weights: TrainedWeights,
    onnx_file: Annotated[
        str | None, option("--onnx", metavar="FILE", text="Write the deployed model as ONNX, run with onnxruntime.")
    ] = None,
    pt2_file: Annotated[
        str | None,
        option("--pt2", metavar="FILE", text="Write the deployed model as a torch.export program (.pt2)."),
    ] = None,
    torchscript_file: Annotated[
        str | None,
        option("--torchscript", metavar="FILE", text="Write traced TorchScript (deprecated by PyTorch; prefer --pt2)."),
    ] = None,
    opset: Annotated[int | None, option(min=7, text="ONNX opset version (default: the exporter's).")] = None,
    static_shape: Annotated[
        bool, option("--static-shape", text="Fix the batch size to the example's instead of leaving it dynamic.")
    ] = False,
    allow_traced: Annotated[
        bool,
        option("--allow-traced", text="Write a traced file even where the model's path may depend on its input."),
    ] = False,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    *,
    structure: Structure,
    inputs: CheckInputs,
    rtol: Rtol = 1e-4,
    force: Force = False,
) -> None:
    """Export the deployed model to ONNX, .pt2 and/or TorchScript, each file checked against the deployed model."""
    from ...api import deploy
    from ...checks.verify import verify
    from ...files import checkpoint
    from ...files.export_check import export_all

    targets = {form: path for form, path in (("onnx", onnx_file), ("pt2", pt2_file),
                                              ("torchscript", torchscript_file)) if path}  # fmt: skip
    if not targets:
        raise ACNetError("nothing to export: pass --onnx FILE, --pt2 FILE and/or --torchscript FILE")
    for path in targets.values():
        checkpoint.ensure_writable(path, force=force)
    if onnx_file:
        from ...files.export import require_onnx

        require_onnx()  # before the model is rebuilt: a missing extra is found at once
    loaded = restore(session, spec, weights, checkpoint_key, arg, structure, Examples.given(inputs))
    deployed = loaded.model
    if loaded.form == "acified":
        with session.spinner("fusing and checking"), loaded.examples.errors():
            deployed = deploy(loaded.model)
            x = loaded.examples.first(loaded.model)
            session.check("deployed vs acified", verify(loaded.model, deployed, *x, rtol=math.inf), rtol)
        raise_failed(session)
    deployed = deployed.cpu().eval()
    examples = loaded.examples.on_cpu()
    names = ", ".join(targets.values())
    with session.spinner(f"exporting {names}"), session.library_warnings(FLAGS), examples.errors(), as_flags(FLAGS):
        written = export_all(
            deployed, examples.first(deployed), targets, opset=opset, dynamic=not static_shape, force=force, rtol=rtol,
            shapes=examples.shapes, allow_traced=allow_traced,
            on_check=lambda label, result: session.check(label, result, rtol),
        )  # fmt: skip
    for exported in written:
        _report(session, exported, rtol)


def _report(session: Session, exported: Exported, rtol: float) -> None:
    """One file's JSON entry and line: what it is, and the inputs it equals the deployed model on."""
    from ...files.export_check import listing

    path, form = exported.path, exported.format
    session.record_file(path, form, inputs=exported.input_names, outputs=exported.output_names,
                        dynamic_batch=exported.dynamic, opset=exported.opset, tracing_fallback=bool(exported.fallback),
                        traced=exported.traced, checked_on=exported.checked_on)  # fmt: skip
    opset_text = f", opset {exported.opset}" if exported.opset else ""
    traced = ", traced" if exported.traced else ""
    only = ", and only on those: it holds the path they took" if exported.traced else ""
    session.say(
        f"wrote {path} ({form}{opset_text}{traced}; inputs {', '.join(exported.input_names)}; outputs "
        f"{', '.join(exported.output_names)}; batch {'dynamic' if exported.dynamic else 'fixed'}): equals the deployed "
        f"model within rtol={rtol:g} on {listing(exported.checked_on)}{only}"
    )
