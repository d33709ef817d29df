"""Honest outcomes on the command line: each bad input gets its one-line message and leaves no file behind."""

import json

import pytest
import torch
from test_cli_features import MODEL, acnet, one_error_line

from acnet_convert.cli.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

DOWNLOADS = """
import urllib.request

from torch import nn


class Pretrained(nn.Module):
    def __init__(self, pretrained=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        if pretrained:
            urllib.request.urlopen("http://127.0.0.1:9/weights.pth")  # nothing listens there: the download fails
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path


def left_behind(folder, *inputs) -> list[str]:
    """Files in ``folder`` other than the inputs the test wrote."""
    return sorted(p.name for p in folder.iterdir() if p.name not in {"model.py", "__pycache__", *inputs})


def test_convert_that_converts_nothing_exits_1_with_the_reasons(folder):
    failed = acnet(folder, "convert", "model.py", "--include", "nomatch*", "-o", "out.safetensors", code=1)
    line = one_error_line(failed)
    assert "no conv was converted (4 conv sites: 4 x not matched by include)" in line and "--allow-empty" in line
    assert left_behind(folder) == []
    acnet(folder, "convert", "model.py", "--include", "nomatch*", "--allow-empty", "-o", "out.safetensors", "-q")
    assert left_behind(folder) == ["out.safetensors"]


def test_a_model_that_downloads_weights_names_the_argument_that_stops_it(folder):
    (folder / "downloads.py").write_text(DOWNLOADS)
    failed = acnet(folder, "convert", "downloads.py", "-o", "out.safetensors", code=2)
    assert "this model downloads weights when built (URLError" in one_error_line(failed)
    assert "pass --arg pretrained=False" in one_error_line(failed)
    assert left_behind(folder, "downloads.py") == []


def test_an_unknown_constructor_argument_is_named(folder):
    failed = acnet(folder, "convert", "model.py", "--arg", "widht=8", "-o", "out.safetensors", code=2)
    assert "--arg widht is not an argument of model.py:Net (it takes width, num_classes); did you mean width?" in (
        one_error_line(failed)
    )
    assert left_behind(folder) == []


def test_an_unknown_block_kind_lists_the_registered_ones(folder):
    failed = acnet(folder, "convert", "model.py", "--block", "layer*=nope", "-o", "out.safetensors", code=2)
    assert "unknown block kind 'nope' in --block: the registered kinds are acb," in one_error_line(failed)
    assert left_behind(folder) == []


def test_a_module_name_includes_everything_under_it(folder):
    report = json.loads(acnet(folder, "inspect", "model.py", "--include", "conv1", "--json").stdout)
    assert [site["action"] for site in report["sites"]] == ["convert", "skip", "skip", "skip"]


def test_stored_arguments_are_applied_with_a_note(folder):
    acnet(folder, "convert", "model.py", "--arg", "width=4", "--input-shape", "1,3,8,8", "-o", "w4.safetensors", "-q")
    result = acnet(folder, "deploy", "model.py:Net", "-w", "w4.safetensors", "-o", "out.safetensors")
    assert "note: using --arg width=4 stored in w4.safetensors (written for model.py, not model.py:Net)" in (
        result.stderr
    )


def test_a_spec_module_imports_the_files_beside_it(folder):
    package = folder / "nets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text("WIDTH = 6\n")
    (package / "net.py").write_text("import layers\nfrom torch import nn\n\n\ndef build():\n"
                                    "    return nn.Sequential(nn.Conv2d(3, layers.WIDTH, 3), nn.BatchNorm2d(6))\n")
    report = json.loads(acnet(folder, "inspect", "nets.net:build", "--json").stdout)
    assert report["summary"].startswith("1 conv sites: 1 converted (1 with their BatchNorm)")


def test_checkpoint_key_chooses_the_ema_entry(folder):
    model = ModelSpec(str(folder / "model.py")).build()
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in model.state_dict().items()}
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema, "epoch": 3}, folder / "both.pt")
    torch.save({"ema_a": ema, "ema_b": ema}, folder / "ambiguous.pt")
    result = acnet(folder, "convert", "model.py", "-w", "both.pt", "-o", "plain.safetensors", "--input-shape", "1,3,8,8",
                   code=0)
    assert "note: read 'state_dict' of both.pt, which also holds state_dict_ema: choose with --checkpoint-key" in (
        result.stderr
    )
    acnet(folder, "convert", "model.py", "-w", "both.pt", "--checkpoint-key", "state_dict_ema", "-o",
          "ema.safetensors", "--input-shape", "1,3,8,8", "-q")  # fmt: skip
    failed = acnet(folder, "convert", "model.py", "-w", "ambiguous.pt", "-o", "out.safetensors", code=2)
    assert "holds several state_dicts (ema_a, ema_b): choose one with --checkpoint-key" in one_error_line(failed)
    failed = acnet(folder, "convert", "model.py", "-w", "both.pt", "--checkpoint-key", "ema", "-o", "out.safetensors",
                   code=2)  # fmt: skip
    assert "has no state_dict under 'ema': its state_dict entries are state_dict, state_dict_ema" in (
        one_error_line(failed)
    )
    assert left_behind(folder, "both.pt", "ambiguous.pt") == ["ema.safetensors", "plain.safetensors"]


def test_inputs_file_that_holds_no_tensors(folder):
    torch.save({"x": torch.zeros(1)}, folder / "dict.pt")
    failed = acnet(folder, "convert", "model.py", "--inputs", "dict.pt", "-o", "out.safetensors", code=2)
    assert "dict.pt holds a dict: save a tensor or a tuple of tensors, one per model input" in one_error_line(failed)
    assert left_behind(folder, "dict.pt") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda(folder):
    failed = acnet(folder, "convert", "model.py", "--device", "cuda", "-o", "out.safetensors", code=2)
    assert "--device cuda: no CUDA device is available here" in one_error_line(failed)
    assert left_behind(folder) == []


def test_an_artifact_for_another_input_shape_names_its_fixed_size(folder):
    acnet(folder, "convert", "model.py", "--input-shape", "2,3,16,16", "-q")
    acnet(folder, "export", "model.py", "-w", "model.acnet.safetensors", "--onnx", "m.onnx", "--static-shape", "-q")
    acnet(folder, "export", "model.py", "-w", "model.acnet.safetensors", "--onnx", "d.onnx", "-q")
    failed = acnet(folder, "verify", "model.py", "-w", "model.acnet.safetensors", "--deployed", "m.onnx",
                   "--input-shape", "2,3,8,8", code=2)  # fmt: skip
    fixed = "m.onnx has a fixed input size 2x3x16x16 (no dimension is dynamic), given 2x3x8x8"
    assert fixed in one_error_line(failed)
    failed = acnet(folder, "verify", "model.py", "-w", "model.acnet.safetensors", "--deployed", "d.onnx",
                   "--input-shape", "1,3,8,8", code=2)  # fmt: skip
    assert "d.onnx has a fixed input size Nx3x16x16 (only the batch N is dynamic), given 1x3x8x8" in (
        one_error_line(failed)
    )
