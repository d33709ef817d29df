"""Files written by acnet-convert 0.2.0 (and 0.1.0-style ones) load and compute what 0.2.0 computed."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from testkit import cli_surface
from typer.testing import CliRunner

from acnet_convert import deploy, load, original_state_dict
from acnet_convert.cli import app

FIXTURES = Path(__file__).parents[1] / "fixtures"
V020 = FIXTURES / "v0.2.0"
sys.path.insert(0, str(FIXTURES))
from models import TinyNet  # noqa: E402

OUTPUTS = safetensors.torch.load_file(V020 / "outputs.safetensors")
X = OUTPUTS["input"]
ACIFIED = {"acb_exact.safetensors": "acb_exact", "acb_exact.pt": "acb_exact", "mixed_exact.safetensors": "mixed_exact",
           "mixed_fast.pt": "mixed_fast", "v0.1.0_acified.safetensors": "acb_exact", "v0.1.0_bare.pt": "acb_exact"}


def close(a, b, rtol=1e-5):
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.mark.parametrize("name", sorted(ACIFIED))
def test_acified_files_resume_and_deploy_to_the_recorded_outputs(name):
    model = load(TinyNet(), V020 / name).eval()
    with torch.no_grad():
        assert close(model(X), OUTPUTS[ACIFIED[name]])
        assert close(deploy(model)(X), OUTPUTS[ACIFIED[name]])


@pytest.mark.parametrize("name", ["plain.safetensors", "original.pt", "mixed_original.safetensors"])
def test_deployed_and_original_files_load_to_the_recorded_outputs(name):
    model = load(TinyNet(), V020 / name).eval()
    want = OUTPUTS["mixed_exact" if name.startswith("mixed") else "plain"]
    with torch.no_grad():
        assert close(model(X), want)


def test_original_weights_of_a_020_checkpoint_equal_the_020_original_file():
    model = load(TinyNet(), V020 / "acb_exact.safetensors")
    shipped = torch.load(V020 / "original.pt", weights_only=True)
    ours = original_state_dict(model)
    assert ours.keys() == shipped.keys()
    assert all(torch.allclose(ours[k].float(), shipped[k].float(), rtol=1e-5, atol=1e-6) for k in ours)


def test_the_command_line_deploys_a_020_cli_checkpoint(tmp_path, monkeypatch):
    shutil.copy(FIXTURES / "models.py", tmp_path / "models.py")
    shutil.copy(V020 / "cli_convert.safetensors", tmp_path / "run.safetensors")
    monkeypatch.chdir(tmp_path)
    trained = ["models.py:TinyNet", "-w", "run.safetensors"]
    result = CliRunner().invoke(app, ["deploy", *trained, "--out", "plain.safetensors", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plain.safetensors").exists()
    result = CliRunner().invoke(app, ["verify", *trained, "--deployed", "plain.safetensors", "--quiet"])
    assert result.exit_code == 0, result.output


def test_inspect_json_is_the_020_document(tmp_path, monkeypatch):
    shutil.copy(FIXTURES / "models.py", tmp_path / "models.py")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect", "models.py:TinyNet", "--input-shape", "1,3,16,16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((V020 / "inspect.json").read_text())


# Help texts reworded since 0.2.0, so that every word keeps one meaning: (command, parameter) -> (old, new).
REWORDED = {
    ("deploy", "fmt"): ("the layout of the weights written", "the form of the weights written"),
    **{(command, "block"): ("qarepvgg (default", "qarepvgg, mobileone, dilated (default")  # kinds added
       for command in ("convert", "inspect")},
}
# Options added since 0.2.0: (command, parameter).
ADDED = {("convert", "search_scales"), ("convert", "search_epochs"), ("convert", "block_option"),
         ("inspect", "block_option"), ("export", "allow_traced")}  # fmt: skip
# Choices added since 0.2.0 (every old choice is still there): parameter -> (old type, new type, words added to help).
EXTENDED = {
    "mode": ("typing.Literal['exact', 'fast']", "typing.Literal['exact', 'fast', 'repopt']",
             "; repopt: the convs stay plain, their gradients preconditioned (exact under SGD)."),
}


def test_every_command_option_and_default_is_the_020_one():
    recorded = json.loads((V020 / "cli.json").read_text())
    for (command, name), (old, new) in REWORDED.items():
        param = next(p for p in recorded[command][1:] if p["name"] == name)
        assert old in param["help"]
        param["help"] = param["help"].replace(old, new)
    for command in recorded.values():
        for param in command[1:]:
            if param["name"] in EXTENDED:
                old, new, added = EXTENDED[param["name"]]
                assert param["type"] == old
                param["type"], param["help"] = new, param["help"].removesuffix(".") + added
    surface = cli_surface(app)
    for command, name in ADDED:
        params = surface[command]
        assert any(p["name"] == name for p in params[1:]), (command, name)
        assert all(p["name"] != name for p in recorded[command][1:])
        surface[command] = [params[0], *(p for p in params[1:] if p["name"] != name)]
    assert surface == recorded
