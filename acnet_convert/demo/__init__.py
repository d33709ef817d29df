"""The demo (the paper's small CNN on 8x8 digits) and what the accuracy study shares with it."""

from .run import DEFAULT_EPOCHS, PLOT_NAME, DemoResult, run_demo

__all__ = ["DEFAULT_EPOCHS", "PLOT_NAME", "DemoResult", "run_demo"]
