"""convert a torchvision model, train it in Python, deploy it in the original layout and export it to ONNX."""

import json

import onnxruntime
import pytest
import safetensors.torch
import torch
import torchvision
from typer.testing import CliRunner

from acnet_convert import acify, verify
from acnet_convert.cli import app

ARGS = ["--arg", "num_classes=10", "--input-shape", "2,3,32,32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def acnet(*args):
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_torchvision_round_trip(tmp_path):
    acnet("convert", "torchvision:resnet18", *ARGS, "--out", tmp_path / "acified.safetensors")

    model = acify(torchvision.models.resnet18(num_classes=10))
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "acified.safetensors"), strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "trained.pt")  # a plain state_dict, as a training script writes it
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "baseline.pt")
    assert model.layer1[0].conv1.branches["hor"].bn.weight.abs().max() > 0  # the new branches have been trained

    acnet(
        "deploy",
        "torchvision:resnet18",
        *ARGS,
        "-w",
        tmp_path / "trained.pt",
        "--format",
        "original",
        "--out",
        tmp_path / "deployed.safetensors",
    )
    original = torchvision.models.resnet18(num_classes=10)
    original.load_state_dict(safetensors.torch.load_file(tmp_path / "deployed.safetensors"), strict=True)
    x = torch.randn(4, 3, 32, 32)
    verify(model, original, x, rtol=1e-5)  # max|acified - original| <= 1e-5 * max(1, max|acified|)

    acnet("export", "torchvision:resnet18", *ARGS, "-w", tmp_path / "trained.pt", "--onnx", tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = model.eval()(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())  # relative 1e-4

    text = acnet("quantcheck", "torchvision:resnet18", *ARGS, "-w", tmp_path / "deployed.safetensors", "--reference",
                 tmp_path / "baseline.pt")  # fmt: skip
    assert "torchvision:resnet18: quantisation" in text and "INT8 PTQ top-1 agreement" in text
    report = json.loads(acnet("quantcheck", "torchvision:resnet18", *ARGS, "-w", tmp_path / "trained.pt", "--reference",
                              tmp_path / "baseline.pt", "--json"))  # fmt: skip
    assert len(report["layers"]) == 21 and report["ptq"]["reference"] is not None
    assert all(layer["reference"] is not None for layer in report["layers"])
    assert report["summary"].startswith("worst layer")
