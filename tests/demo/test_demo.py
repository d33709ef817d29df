"""The demo on a reduced budget: the deployed model must predict exactly what the trained ACNet predicts."""

import os
import re
import subprocess
import sys

from rich.console import Console

from acnet_convert.demo import PLOT_NAME, run_demo

CHANCE = 100 / 10


def table_row(text: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label``."""
    line = next(line for line in text.splitlines() if re.match(rf"\W*{label}\b", line))
    return [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()][1:]


def test_run_demo_deploys_the_trained_model_exactly(tmp_path):
    console = Console(record=True, width=120)
    result = run_demo(epochs=2, seed=1, out_dir=tmp_path, console=console)
    text = console.export_text()

    assert result.predictions_equal and result.same_predictions == result.test_size > 0
    assert result.relative_error < 1e-5
    assert result.deployed_accuracy == result.acnet_accuracy
    assert result.baseline_accuracy > 3 * CHANCE and result.acnet_accuracy > 3 * CHANCE
    assert result.deployed_parameters < result.baseline_parameters < result.training_parameters
    assert len(result.acnet_history.loss) == len(result.baseline_history.accuracy) == 2

    assert table_row(text, "same predictions") == [f"{result.test_size}/{result.test_size}"]
    assert table_row(text, "test accuracy") == [
        f"{a:.2f}%" for a in (result.baseline_accuracy, result.acnet_accuracy, result.deployed_accuracy)
    ]
    assert "3 conv sites: 3 converted (3 with their BatchNorm)" in text
    assert result.plot == tmp_path / PLOT_NAME
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quiet_demo_prints_nothing_and_writes_no_plot_without_a_directory(capsys):
    result = run_demo(epochs=1, seed=2, out_dir=None, quiet=True)
    assert capsys.readouterr().out == ""
    assert result.plot is None and result.predictions_equal


def test_demo_command_prints_a_table_that_proves_the_deployment(tmp_path):
    command = [sys.executable, "-m", "acnet_convert.cli", "demo", "--epochs", "1", "--seed", "3", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr

    same, total = map(int, table_row(done.stdout, "same predictions")[0].split("/"))
    assert same == total > 0
    accuracies = [float(cell.rstrip("%")) for cell in table_row(done.stdout, "test accuracy")]
    assert len(accuracies) == 3 and min(accuracies) > CHANCE and accuracies[1] == accuracies[2]
    assert (tmp_path / PLOT_NAME).is_file()
