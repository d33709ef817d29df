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
    from torch import nn

EPILOG = epilog(
    "acnet export torchvision:resnet18 -w trained.safetensors --onnx resnet18.onnx --input-shape 2,3,224,224",
    "acnet export model.py -w trained.pt --pt2 model.pt2 --onnx model.onnx --opset 18",
    note="ONNX needs the onnx extra: pip install 'acnet-convert\\[onnx]'. The batch dimension is dynamic unless "
    "--static-shape; each file is run at the example batch size and at another one and compared with the "
    "deployed model. TorchScript is deprecated by PyTorch: prefer --pt2.",
)
# The library's advice, as flags: its errors name Python functions and arguments.
FLAGS = {
    "use export_onnx": "export --onnx", "export_torchscript": "--torchscript", "export_pt2": "--pt2",
    "export_onnx": "--onnx", 'save_weights(model, path, "plain")': "acnet deploy --format plain",
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
    for form, path in targets.items():
        _export(session, form, path, deployed, examples, opset=opset, dynamic=not static_shape, force=force, rtol=rtol)


def _export(
    session: Session, form: str, path: str, deployed: nn.Module, examples: Examples, *, opset: int | None,
    dynamic: bool, force: bool, rtol: float,
) -> None:  # fmt: skip
    """One file exported and checked by the library; its checks, JSON entry and line rendered."""
    from ...files.export import export_checked

    with session.spinner(f"exporting {path}"), session.library_warnings(), examples.errors(), as_flags(FLAGS):
        exported = export_checked(
            deployed, examples.first(deployed), path, form, opset=opset, dynamic=dynamic, force=force, rtol=rtol,
            shapes=examples.shapes, on_check=lambda label, result: session.check(label, result, rtol),
        )  # fmt: skip
    session.record_file(path, form, inputs=exported.input_names, outputs=exported.output_names, dynamic_batch=dynamic,
                        opset=exported.opset, tracing_fallback=bool(exported.fallback))  # fmt: skip
    sizes = " and ".join(map(str, exported.checked_batches))
    opset_text = f", opset {exported.opset}" if exported.opset else ""
    session.say(
        f"wrote {path} ({form}{opset_text}; inputs {', '.join(exported.input_names)}; outputs "
        f"{', '.join(exported.output_names)}; batch {'dynamic' if dynamic else 'fixed'}): equals the deployed model "
        f"within rtol={rtol:g} at batch size {sizes}"
    )
