"""``acnet convert``: a model's eligible convs turned into training blocks, checked, written with the plan."""

from __future__ import annotations

import math
from typing import Annotated

from ...constants import DEFAULT_GAMMA, INITS
from ...errors import ACNetError
from ..examples import Examples
from ..framework import NothingConverted, epilog
from ..options import (
    Args,
    Block,
    BlockOption,
    CheckInputs,
    CheckpointKey,
    Force,
    GammaInit,
    Init,
    Rtol,
    Spec,
    Structure,
    acify_options,
    block_choice,
    block_options,
    option,
)  # fmt: skip
from ..render import nothing_converted, raise_failed, report_plan
from ..restore import acified, check_block, load_original_weights, model_spec, search_batches, searched
from ..session import Session

EPILOG = epilog(
    "acnet convert torchvision:resnet18 --arg num_classes=10 --input-shape 1,3,32,32",
    "acnet convert model.py --weights pretrained.pt --exclude head --block 'layer4.*=dbb'",
    "acnet convert segnet.py --input-shape 2,3,64,64 --input-shape 2,1,64,64 --out seg.acnet.safetensors",
    "acnet convert model.py --mode repopt --block repvgg --search-scales batches.pt --search-epochs 3",
    note="The checkpoint is the acified model with the plan it was built by; train it in Python "
    "(acnet_convert.load rebuilds it), then run acnet deploy.",
)


def main(
    session: Session,
    spec: Spec,
    arg: Args = None,
    weights: Annotated[
        str | None, option("--weights", "-w", metavar="FILE", text="Weights of the unconverted model to start from.")
    ] = None,
    checkpoint_key: CheckpointKey = None,
    out_file: Annotated[
        str | None,
        option("--out", "-o", metavar="FILE", text="Output, .safetensors or .pt (default NAME.acnet.safetensors)."),
    ] = None,
    block: Block = None,
    block_option: BlockOption = None,
    init: Init = INITS[0],
    gamma_init: GammaInit = DEFAULT_GAMMA,
    *,
    structure: Structure,
    inputs: CheckInputs,
    allow_empty: Annotated[
        bool, option("--allow-empty", text="Write the checkpoint even when no conv is converted.")
    ] = False,
    rtol: Rtol = 1e-4,
    force: Force = False,
    search_scales: Annotated[
        str | None,
        option("--search-scales", metavar="FILE", text="With --mode repopt: first search the branch scales, training "
               "the fast blocks on FILE (a .pt of an 'inputs' and a 'targets' tensor; cross-entropy, SGD)."),
    ] = None,
    search_epochs: Annotated[int, option(min=1, text="Epochs of the scale search (default 1).")] = 1,
) -> None:
    """Turn every eligible conv (with its BatchNorm) into a training block and write the checkpoint, checked."""
    from ...api import deploy
    from ...checks.verify import verify
    from ...files import checkpoint
    from ...files.roundtrip import save_weights

    parsed = model_spec(session, spec, arg)
    target = checkpoint.ensure_writable(out_file or f"{parsed.stem}.acnet.safetensors", force=force)
    checkpoint.serialization(target)
    options = acify_options({}, block=block_choice(block), block_options=block_options(block_option), init=init,
                            gamma_init=gamma_init, structure=structure)  # fmt: skip
    if search_scales and options["mode"] != "repopt":
        raise ACNetError("--search-scales searches the scales of --mode repopt: add --mode repopt")
    batches = search_batches(search_scales) if search_scales else None
    examples = Examples.given(inputs)
    with session.spinner(f"converting {spec}"):
        check_block(parsed, options)
        original = parsed.build()
        if weights:
            load_original_weights(session, original, weights, checkpoint_key)
        original = original.to(examples.device).eval()
        if batches is None:
            model = acified(session, original, options, examples, inplace=False)
    if batches is not None:
        with session.spinner(f"searching the scales for {search_epochs} epoch(s)"):
            model = searched(session, original, options, examples, batches, search_epochs)
    report_plan(session, model.acnet_plan, spec)
    if not model.acnet_plan.converted and not allow_empty:
        raise NothingConverted(nothing_converted(model.acnet_plan))
    with session.spinner("checking"), examples.errors():
        x = examples.first(model)
        if init == "preserve":
            session.check("acified vs original", verify(original, model, *x, rtol=math.inf), rtol)
        if model.acnet_plan.converted:  # with --allow-empty there may be nothing to fuse
            session.check("deployed vs acified", verify(model, deploy(model), *x, rtol=math.inf), rtol)
    raise_failed(session)
    origin = {"spec": spec, "args": parsed.args, "options": options, **examples.recorded()}
    form = "acified" if model.acnet_plan.converted else "plain"  # with --allow-empty: a model without blocks
    save_weights(model, target, form, force=force, origin=origin)
    session.wrote(target, form)
