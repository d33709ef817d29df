"""The whole ACNet idea in one command: convert, train, deploy, and prove the deployed model is the same model.

Run with ``python -m acnet_convert.demo`` (options: ``--help``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..api import acify, deploy
from ..checks.verify import verify
from ..constants import DEMO_EPOCHS
from .experiment import History, Recipe, Split, count_parameters, load_digits, predict, single_thread, train
from .models import SmallCNN

PLOT_NAME = "acnet-demo.png"
DEFAULT_EPOCHS = DEMO_EPOCHS


@dataclass
class DemoResult:
    """What the demo measured: accuracies, parameter counts, the deployed model's agreement and timings."""

    epochs: int
    seed: int
    test_size: int
    baseline_accuracy: float
    acnet_accuracy: float
    deployed_accuracy: float
    same_predictions: int
    max_abs_error: float
    relative_error: float
    baseline_parameters: int
    training_parameters: int
    deployed_parameters: int
    baseline_seconds: float
    acnet_seconds: float
    total_seconds: float
    baseline_history: History
    acnet_history: History
    plot: Path | None

    @property
    def predictions_equal(self) -> bool:
        """True when the deployed model predicts the same class as the trained ACNet for every test image."""
        return self.same_predictions == self.test_size


def run_demo(
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    out_dir: str | Path | None = ".",
    quiet: bool = False,
    console: Console | None = None,
) -> DemoResult:
    """Train the paper's small CNN on the 8x8 digits as a baseline and as an ACNet, deploy the ACNet, compare.

    ``out_dir`` receives the loss/accuracy plot (when matplotlib is installed; ``None``
    writes no plot); ``quiet`` prints nothing.
    """
    console = console or Console(quiet=quiet)
    start = time.perf_counter()
    with single_thread():
        split = load_digits()
        torch.manual_seed(seed)
        baseline = SmallCNN(split.in_channels, split.num_classes)
        acnet = acify(baseline, init="scratch")
        console.print(str(acnet.acnet_plan), markup=False, highlight=False)
        recipe = Recipe(epochs=epochs)
        with _progress(console) as progress:
            baseline_history = _train_with_bar(baseline, "baseline", split, recipe, seed, progress)
            acnet_history = _train_with_bar(acnet, "ACNet", split, recipe, seed, progress)
        deployed = deploy(acnet.eval())
        check = verify(acnet, deployed, split.x_test)
        deployed_predictions = predict(deployed, split.x_test)
        same = (deployed_predictions == predict(acnet, split.x_test)).sum().item()
        deployed_accuracy = (deployed_predictions == split.y_test).float().mean().item() * 100
    title = f"SmallCNN on {split.name}, seed {seed}: baseline vs ACNet"
    plot = write_plot(baseline_history, acnet_history, Path(out_dir), title) if out_dir is not None else None
    result = DemoResult(
        epochs=epochs,
        seed=seed,
        test_size=len(split.y_test),
        baseline_accuracy=baseline_history.accuracy[-1],
        acnet_accuracy=acnet_history.accuracy[-1],
        deployed_accuracy=deployed_accuracy,
        same_predictions=same,
        max_abs_error=check.max_abs,
        relative_error=check.relative,
        baseline_parameters=count_parameters(baseline),
        training_parameters=count_parameters(acnet),
        deployed_parameters=count_parameters(deployed),
        baseline_seconds=baseline_history.seconds,
        acnet_seconds=acnet_history.seconds,
        total_seconds=time.perf_counter() - start,
        baseline_history=baseline_history,
        acnet_history=acnet_history,
        plot=plot,
    )
    console.print(summary_table(result, split))
    return result


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
        TextColumn("{task.fields[status]}"), console=console,
    )  # fmt: skip


def _train_with_bar(model, name: str, split: Split, recipe: Recipe, seed: int, progress: Progress) -> History:
    task = progress.add_task(name, total=recipe.epochs, status="")

    def report(epoch: int, loss: float, accuracy: float) -> None:
        progress.update(task, advance=1, status=f"loss {loss:.3f}  test accuracy {accuracy:.1f}%")

    return train(model, split, recipe, seed, on_epoch=report)


def summary_table(result: DemoResult, split: Split) -> Table:
    """The demo's summary as a rich table."""
    table = Table(title=f"ACNet demo: SmallCNN on {split.name}, {result.epochs} epochs, seed {result.seed}")
    table.add_column("")
    for name in ("baseline", "ACNet (training)", "ACNet (deployed)"):
        table.add_column(name, justify="right")
    table.add_row(
        "test accuracy",
        f"{result.baseline_accuracy:.2f}%", f"{result.acnet_accuracy:.2f}%", f"{result.deployed_accuracy:.2f}%",
    )  # fmt: skip
    table.add_row(
        "parameters",
        f"{result.baseline_parameters:,}", f"{result.training_parameters:,}", f"{result.deployed_parameters:,}",
    )  # fmt: skip
    table.add_row("training time", f"{result.baseline_seconds:.1f} s", f"{result.acnet_seconds:.1f} s", "")
    table.add_row("same predictions", "", "", f"{result.same_predictions}/{result.test_size}")
    table.add_row("max output error", "", "", f"{result.max_abs_error:.1e}")
    table.caption = (
        f"deployed vs trained ACNet on all {result.test_size} test images; total time {result.total_seconds:.1f} s"
        + (f"; plot: {result.plot}" if result.plot else "")
    )
    return table


def write_plot(baseline: History, acnet: History, out_dir: Path, title: str) -> Path | None:
    """Save training loss and test accuracy per epoch as a PNG; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    fig.suptitle(title)
    for label, history in (("baseline", baseline), ("ACNet", acnet)):
        epochs = range(1, len(history.loss) + 1)
        loss_ax.plot(epochs, history.loss, marker="o", markersize=3, label=label)
        acc_ax.plot(epochs, history.accuracy, marker="o", markersize=3, label=label)
    loss_ax.set(title="training loss", xlabel="epoch", yscale="log")
    acc_ax.set(title="test accuracy (%)", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    path = out_dir / PLOT_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

