"""``acnet quantcheck``: how well every conv and linear layer of the deployed model survives quantisation."""

from __future__ import annotations

from typing import Annotated

from ..examples import Examples
from ..framework import as_flags, epilog
from ..options import Args, CheckpointKey, InputOptions, Spec, Structure, option
from ..render import report_quant_table
from ..restore import restore
from ..session import Session

EPILOG = epilog(
    "acnet quantcheck torchvision:resnet18 -w deployed.safetensors --input-shape 8,3,224,224",
    "acnet quantcheck model.py -w trained.safetensors --reference baseline.pt --inputs calibration.pt --json",
    note="Per layer: weight outliers, SQNR at 8 and 4 bits (per tensor and per channel), the output range on the "
    "inputs, and a flag with advice; then a static INT8 post-training quantisation of the whole model on the "
    "inputs (CPU), compared with the float model.",
)

FLAGS = {"pass ptq=False to quant_report": "pass --no-ptq"}  # the library's advice, as a flag


def main(
    session: Session,
    spec: Spec,
    weights: Annotated[
        str, option("--weights", "-w", metavar="FILE", text="Any checkpoint of the model: acified, deployed or plain.")
    ],
    reference: Annotated[
        str | None,
        option(metavar="FILE", text="Weights of the unconverted model of the same spec, to compare each layer with."),
    ] = None,
    checkpoint_key: CheckpointKey = None,
    arg: Args = None,
    *,
    inputs: InputOptions,
    no_ptq: Annotated[bool, option("--no-ptq", text="Skip the INT8 post-training quantisation check.")] = False,
) -> None:
    """Report how well every conv and linear layer of the deployed model survives quantisation (INT8, INT4)."""
    from ...api import deploy
    from ...blocks import has_blocks
    from ...checks.quant import quant_report
    from ...files.roundtrip import load

    loaded = restore(session, spec, weights, checkpoint_key, arg, Structure(), Examples.given(inputs))
    model = deploy(loaded.model) if loaded.form == "acified" else loaded.model
    baseline = None
    if reference:
        baseline = load(loaded.spec.build(), reference)
        baseline = deploy(baseline) if has_blocks(baseline) else baseline
    with session.spinner("measuring"), session.library_warnings(FLAGS), loaded.examples.errors(), as_flags(FLAGS):
        x = loaded.examples.first(model)
        report = quant_report(model, reference=baseline, inputs=x, ptq=not no_ptq)
    session.record.update(report.to_dict())
    report_quant_table(session, report.table(), f"{spec}: quantisation")
    session.say(report.summary())
