"""search_scales: the fast blocks trained on the data, their scales recorded in the plan and frozen into masks."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from csla import CONVS, Net
from typer.testing import CliRunner

from acnet_convert import ACNetError, load, save_weights, search_scales
from acnet_convert.cli import app
from acnet_convert.repopt import is_masked

FIXTURES = Path(__file__).parents[1] / "fixtures"


def data(batches=3):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 12, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(batches)]  # fmt: skip


@pytest.mark.parametrize("kind", ["acb", "repvgg", "dbb"])
def test_the_searched_scales_are_recorded_and_become_the_masks(kind, tmp_path):
    model = Net()
    found = search_scales(model, data(), block=kind, epochs=2, lr=0.1)
    assert not any(is_masked(m) for m in model.modules())  # the model given is left as it was
    for site in found.acnet_plan.converted:
        conv = found.get_submodule(site.name)
        assert is_masked(conv) and site.mode == "repopt"
        square = torch.tensor(site.scales["square"])
        assert square.shape == (conv.out_channels,) and (square - 1).abs().max() > 1e-4  # trained away from 1
        corner = conv.repopt_mask[:, 0, 0, 0].double()  # only the KxK branch covers a corner
        assert torch.allclose(corner, square.double() ** 2, rtol=1e-6)
    assert sorted({n for s in found.acnet_plan.converted for n in s.scales}) == sorted(
        {"acb": ["square", "row", "column"], "repvgg": ["square", "pointwise"], "dbb": ["square", "pointwise", "avg"]}
        [kind])  # fmt: skip
    loaded = load(Net(), save_weights(found, tmp_path / "searched.safetensors"))
    assert all(torch.equal(getattr(loaded, n).repopt_mask, getattr(found, n).repopt_mask) for n in CONVS)


def test_bad_search_arguments_are_named():
    with pytest.raises(ACNetError, match="epochs >= 1"):
        search_scales(Net(), data(), epochs=0)
    with pytest.raises(ACNetError, match="no batches"):
        search_scales(Net(), [])


def test_the_command_line_searches_the_scales_and_names_its_flags(tmp_path, monkeypatch):
    shutil.copy(FIXTURES / "models.py", tmp_path / "models.py")
    monkeypatch.chdir(tmp_path)
    torch.save({"inputs": torch.randn(40, 3, 16, 16), "targets": torch.randint(0, 5, (40,))}, "batches.pt")
    convert = ["convert", "models.py:TinyNet", "--input-shape", "1,3,16,16", "--quiet"]
    result = CliRunner().invoke(app, [*convert, "--mode", "repopt", "--block", "repvgg", "--search-scales",
                                      "batches.pt", "--search-epochs", "2", "--out", "run.safetensors"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sys.path.insert(0, str(tmp_path))
    from models import TinyNet

    trained = load(TinyNet(), "run.safetensors")
    sites = trained.acnet_plan.converted
    assert sites and all(s.mode == "repopt" and len(s.scales["square"]) > 1 for s in sites)
    assert all(is_masked(trained.get_submodule(s.name)) for s in sites)
    result = CliRunner().invoke(app, ["deploy", "models.py:TinyNet", "-w", "run.safetensors", "--out", "plain.safetensors",
                                      "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not any(is_masked(m) for m in load(TinyNet(), "plain.safetensors").modules())
    result = CliRunner().invoke(app, ["inspect", "models.py:TinyNet", "--mode", "repopt", "--block", "dbb", "--json"])
    assert result.exit_code == 0, result.output
    listed = [s for s in json.loads(result.stdout)["sites"] if s["action"] == "convert"]
    assert listed and all(s["mode"] == "repopt" and "(gradient)" in s["branches"] for s in listed)
    result = CliRunner().invoke(app, [*convert, "--search-scales", "batches.pt"])
    assert result.exit_code == 2 and "error: --search-scales" in result.output and "--mode repopt" in result.output
    torch.save({"inputs": torch.randn(4, 3, 16, 16)}, "bad.pt")
    result = CliRunner().invoke(app, [*convert, "--mode", "repopt", "--search-scales", "bad.pt"])
    assert result.exit_code == 2 and "error: --search-scales bad.pt must hold" in result.output
