"""``acnet inspect``: every conv of a model, converted or skipped and why, and the parameter counts of each form."""

from __future__ import annotations

import warnings

from ..examples import Examples
from ..framework import epilog
from ..options import (
    Args,
    Block,
    BlockOption,
    ExampleInputs,
    Spec,
    Structure,
    acify_options,
    block_choice,
    block_options,
)  # fmt: skip
from ..render import report_plan
from ..restore import acified, check_block, model_spec
from ..session import Session

EPILOG = epilog(
    "acnet inspect torchvision:resnet18",
    "acnet inspect model.py:Net --arg width=64 --exclude stem --block 'layer4=dbb'",
    "acnet inspect timm:resnet18d --json > sites.json",
)


def main(
    session: Session,
    spec: Spec,
    arg: Args = None,
    block: Block = None,
    block_option: BlockOption = None,
    *,
    structure: Structure,
    inputs: ExampleInputs,
) -> None:
    """Show every conv of the model: converted or skipped (and why), its block kind, the BatchNorm it absorbs."""
    from ...api import deploy

    parsed = model_spec(session, spec, arg)
    options = acify_options({}, block=block_choice(block), block_options=block_options(block_option),
                            structure=structure)  # fmt: skip
    examples = Examples.given(inputs)
    with session.spinner(f"analysing {spec}"):
        check_block(parsed, options)
        original = parsed.build().to(examples.device)
        counts = {"original": _parameters(original)}
        model = acified(session, original, options, examples, inplace=True)
        counts["training"] = _parameters(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model with nothing converted is a valid thing to inspect
            counts["deployed"] = _parameters(deploy(model, check=False))  # only counted: no weights leave inspect
    report_plan(session, model.acnet_plan, spec)
    session.record["parameters"] = counts
    session.say(f"parameters: {', '.join(f'{form} {count:,}' for form, count in counts.items())}")


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
