"""``acnet demo``: the paper's small CNN trained on 8x8 digits as baseline and ACNet, deployed, predictions compared."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from ...constants import DEMO_EPOCHS
from ...errors import VerificationError
from ..framework import EXIT_CODES, epilog
from ..options import option
from ..session import Session

EPILOG = epilog("acnet demo", "acnet demo --epochs 5 --out-dir /tmp --quiet", note=EXIT_CODES)


def main(
    session: Session,
    epochs: Annotated[int, option(min=1, text=f"Training epochs per model (default {DEMO_EPOCHS}).")] = DEMO_EPOCHS,
    seed: Annotated[int, option(text="Seed for the weights and the batch order (default 0).")] = 0,
    out_dir: Annotated[str, option(metavar="DIR", text="Where to write acnet-demo.png (default .).")] = ".",
) -> None:
    """Train the paper's small CNN on 8x8 digits as baseline and ACNet, deploy it, prove the predictions equal."""
    from ...demo.run import run_demo

    result = run_demo(epochs=epochs, seed=seed, out_dir=out_dir, quiet=session.quiet or session.as_json)
    figures = {key: value for key, value in asdict(result).items() if isinstance(value, (int, float))}
    session.record.update(figures, predictions_equal=result.predictions_equal)
    if result.plot:
        session.record_file(result.plot, "plot")
    if not result.predictions_equal:
        raise VerificationError("the deployed model predicts differently from the trained one: report this as a bug")
