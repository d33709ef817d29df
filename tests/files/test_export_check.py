"""Exports that cannot be silently wrong: a traced file says so, is checked beyond its example, is refused where the
plan says the model's path depends on its input, and several files are written all or none."""

import pytest
import torch
from torch import nn

from acnet_convert import ACNetError, acify, deploy
from acnet_convert.errors import VerificationError
from acnet_convert.files import export as export_module
from acnet_convert.files.export import load_artifact
from acnet_convert.files.export_check import export_all, export_checked

pytestmark = pytest.mark.usefixtures("one_thread")


class Branchy(nn.Module):
    """One path for inputs of a positive mean, another for the rest: a trace holds only one of them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 0:
            return self.bn(self.conv(x))
        return -self.bn(self.conv(x))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


EXAMPLE = (torch.rand(2, 3, 8, 8),)  # a positive mean: the first path


def files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def acified_branchy():
    """Acified with an example run: its plan records the conv as decided by that input."""
    model = acify(Branchy(), example_inputs=EXAMPLE)
    assert model.acnet_plan.input_dependent == ["conv"]
    return deploy(model).eval()


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_a_traced_export_of_an_input_dependent_plan_is_refused_then_caught_by_its_check(
    acified_branchy, format, tmp_path
):
    path = tmp_path / f"m.{format}"
    with pytest.raises(ACNetError, match=r"would be traced, .* 1 conv\(s\) decided by the example run \(conv\).* "
                       r"pass allow_traced=True"):  # fmt: skip
        export_checked(acified_branchy, EXAMPLE, path, format)
    with pytest.warns(UserWarning, match="recorded in .* only the path the example took") as caught:
        with pytest.raises(VerificationError, match="on the example negated .* the file was traced"):
            export_checked(acified_branchy, EXAMPLE, path, format, allow_traced=True)
    assert all(w.filename == __file__ for w in caught if "recorded in" in str(w.message))  # the caller's line
    assert files(tmp_path) == []


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_a_wrong_path_is_caught_without_a_plan_too(format, tmp_path):
    with pytest.warns(UserWarning, match="only the path the example took"):
        with pytest.raises(VerificationError, match="the example negated"):
            export_checked(Branchy().eval(), EXAMPLE, tmp_path / f"m.{format}", format)
    assert files(tmp_path) == []


def test_the_onnx_fallback_warning_keeps_torch_exports_reason_and_the_line_it_names(tmp_path):
    with pytest.warns(UserWarning) as caught, pytest.raises(VerificationError):
        export_checked(Branchy().eval(), EXAMPLE, tmp_path / "m.onnx", "onnx")
    message = next(str(w.message) for w in caught if "torch.export could not capture" in str(w.message))
    assert "Could not guard on data-dependent expression" in message and "if x.mean() > 0:" in message
    assert "\x1b" not in message and "\n" not in message


def test_a_traced_file_says_what_it_was_checked_on_and_reads_back_as_traced(tmp_path):
    with pytest.warns(UserWarning, match="TorchScript recorded"):
        exported = export_checked(Plain().eval(), EXAMPLE, tmp_path / "m.ts", "torchscript")
    assert exported.traced and exported.checked_on == [
        "the example (batch 2)", "the example negated (batch 2)", "random inputs (batch 1)"]  # fmt: skip
    assert load_artifact(tmp_path / "m.ts").traced
    assert not load_artifact(export_checked(Plain().eval(), EXAMPLE, tmp_path / "m.pt2", "pt2").path).traced


def test_several_formats_are_written_all_or_none(tmp_path, monkeypatch):
    def failing_trace(*args, **kwargs):
        raise RuntimeError("tracing broke")

    monkeypatch.setattr(torch.jit, "trace", failing_trace)
    targets = {"pt2": tmp_path / "sub" / "m.pt2", "torchscript": tmp_path / "m.ts"}
    with pytest.raises(ACNetError, match="TorchScript tracing failed"):
        export_all(Plain().eval(), EXAMPLE, targets)
    assert files(tmp_path) == []  # not the .pt2 written first, nor the folder made for it
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="TorchScript recorded"):
        written = export_all(Plain().eval(), EXAMPLE, targets)
    assert [exported.path for exported in written] == list(targets.values())
    assert all(path.is_file() for path in targets.values())


def test_an_onnx_file_of_a_fixed_size_says_so_in_one_line(tmp_path):
    export_checked(Plain().eval(), EXAMPLE, tmp_path / "m.onnx", "onnx")
    artifact = load_artifact(tmp_path / "m.onnx")
    with pytest.raises(ACNetError, match=r"^m.onnx has a fixed input size Nx3x8x8 \(only the batch N is dynamic\), "
                       r"given 2x3x4x4: "):  # fmt: skip
        artifact(torch.rand(2, 3, 4, 4))
    assert isinstance(export_module.OnnxModel(tmp_path / "m.onnx")(torch.rand(5, 3, 8, 8)), torch.Tensor)
