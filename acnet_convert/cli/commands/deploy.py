"""``acnet deploy``: every block of a trained checkpoint fused into one conv, checked, written plain or original."""

from __future__ import annotations

import math
from typing import Annotated

from ..examples import Examples
from ..framework import as_flags, epilog
from ..options import (
    Args,
    CheckInputs,
    CheckpointKey,
    DeployedFormat,
    Force,
    Rtol,
    Spec,
    Structure,
    TrainedWeights,
    option,
)  # fmt: skip
from ..render import quant_summary, raise_failed
from ..restore import restore
from ..session import Session

EPILOG = epilog(
    "acnet deploy torchvision:resnet18 -w trained.safetensors --out resnet18.deployed.safetensors",
    "acnet deploy model.py -w trained.pt --out deployed.pt --format original",
    note="--format plain: converted convs have a bias and absorbed BatchNorms are gone; it loads into "
    "deploy(acify(model)). --format original: loads with strict=True into the unmodified model (each absorbed "
    "BatchNorm becomes an exact identity plus the fused bias), so deployment code needs nothing from "
    "acnet-convert. After writing, one line sums up how the deployed weights will quantise (acnet quantcheck "
    "for the details).",
)

FLAGS = {"use format plain": "use --format plain"}  # the library's advice, as a flag


def main(
    session: Session,
    spec: Spec,
    weights: TrainedWeights,
    out_file: Annotated[
        str | None,
        option("--out", "-o", metavar="FILE", text="Output, .safetensors or .pt (default NAME.deployed.safetensors)."),
    ] = None,
    fmt: DeployedFormat = "plain",
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    *,
    structure: Structure,
    inputs: CheckInputs,
    rtol: Rtol = 1e-4,
    force: Force = False,
) -> None:
    """Fuse every block of a trained checkpoint into one conv and write the deployed weights, checked."""
    from ...api import deploy
    from ...checks.verify import verify
    from ...files import checkpoint
    from ...files.roundtrip import original_state_dict, save_weights

    loaded = restore(session, spec, weights, checkpoint_key, arg, structure, Examples.given(inputs))
    target = checkpoint.ensure_writable(out_file or f"{loaded.spec.stem}.deployed.safetensors", force=force)
    checkpoint.serialization(target)
    acified = loaded.require("acified", "pass the acified checkpoint, trained")
    with session.spinner("fusing and checking"), loaded.examples.errors(), as_flags(FLAGS):
        deployed = deploy(acified)
        x = loaded.examples.first(acified)
        session.check("deployed vs acified", verify(acified, deployed, *x, rtol=math.inf), rtol)
        if fmt == "original":
            fresh = loaded.spec.build().to(loaded.examples.device)
            state = original_state_dict(deployed)
            checkpoint.load_strict(fresh, state, source="the original-format weights", hint="report this as a bug")
            session.check("unmodified model with these weights vs acified", verify(acified, fresh, *x, rtol=math.inf),
                          rtol)  # fmt: skip
    raise_failed(session)
    session.record["summary"] = acified.acnet_plan.summary()
    session.say(acified.acnet_plan.summary())
    save_weights(deployed, target, fmt, force=force, origin=loaded.origin())
    session.wrote(target, fmt)
    quant_summary(session, deployed)
