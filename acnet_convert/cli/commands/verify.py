"""``acnet verify``: the trained model against its deployed form, layer by layer, and against a shipped file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ...errors import ACNetError
from ..examples import Examples
from ..framework import EXIT_CODES, epilog
from ..options import Args, CheckInputs, CheckpointKey, Rtol, Spec, Structure, TrainedWeights, option
from ..render import keep_worst, report_rows
from ..restore import load_shipped, restore
from ..session import Session

if TYPE_CHECKING:
    from ...checks.verify import Comparison

EPILOG = epilog(
    "acnet verify torchvision:resnet18 -w trained.safetensors --input-shape 1,3,64,64",
    "acnet verify model.py -w trained.pt --deployed deployed.safetensors --samples 32",
    "acnet verify model.py -w trained.pt --deployed model.onnx --inputs batch.pt",
    note=EXIT_CODES,
)


def main(
    session: Session,
    spec: Spec,
    weights: TrainedWeights,
    deployed_file: Annotated[
        str | None,
        option(
            "--deployed",
            metavar="FILE",
            text="Also check this file: weights written by acnet deploy, or an exported .onnx, .pt2 or TorchScript.",
        ),
    ] = None,
    samples: Annotated[int, option(min=1, text="Number of random inputs (default 8).")] = 8,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    *,
    structure: Structure,
    inputs: CheckInputs,
    rtol: Rtol = 1e-4,
) -> None:
    """Compare the trained model with its deployed form, layer by layer, and with a shipped file (exit 1: differ)."""
    from ...api import deploy
    from ...checks.verify import verify

    if deployed_file and not Path(deployed_file).is_file():  # before the model is rebuilt
        raise ACNetError(f"--deployed {deployed_file} not found: give the file acnet deploy or acnet export wrote")
    loaded = restore(session, spec, weights, checkpoint_key, arg, structure, Examples.given(inputs))
    reference = loaded.model
    deployed = deploy(reference) if loaded.form == "acified" else None
    if deployed is None and not deployed_file:
        raise ACNetError(f"{weights} holds the {loaded.form} model, which has nothing to fuse: pass --deployed FILE")
    shipped = load_shipped(deployed_file, loaded, deployed) if deployed_file else None
    shipped_row = f"output ({deployed_file})"
    rows: dict[str, Comparison] = {}
    shipped_failed = []  # for each input, whether the shipped file differs on it
    with loaded.examples.errors(), session.bar("comparing", samples) as advance:
        for x in loaded.examples.all(reference, samples):
            if deployed is not None:
                result = verify(reference, deployed, *x, rtol=math.inf, layers=True)
                keep_worst(rows, {**result.layers, "output (deployed in memory)": result})
            if shipped is not None:
                result = verify(reference, shipped, *x, rtol=math.inf)
                keep_worst(rows, {shipped_row: result})
                shipped_failed.append(result.relative > rtol)
            advance()

    def cause(worst: str) -> str:
        """Why the shipped file differs, when it is the worst: a traced path some inputs leave, else other weights."""
        if worst != shipped_row:
            return ""
        traced = (
            f"{deployed_file} was traced on an example and holds only the path that example took through the model"
        )
        if getattr(shipped, "traced", False) and not all(shipped_failed):
            return (
                f"{traced}, which some of these inputs leave: export it with --pt2 (torch.export), or make the "
                "model's path independent of its input"
            )
        also = f"; {traced}, so inputs that all leave that path differ too" if getattr(shipped, "traced", False) else ""
        return (
            f"{deployed_file} differs on every input: it does not hold the model {weights} deploys to (other weights, "
            f"or written before more training): deploy or export it again from {weights}{also}"
        )

    report_rows(session, rows, spec, loaded.examples, rtol, cause)
