"""What the command line says where a user leaves the common path: traced artifacts and their causes, warnings as
one line, our words for bad values, repeated options, and output that stays whole when piped."""

import json
import warnings

import pytest
import torch
from test_cli_features import MODEL, acnet, one_error_line
from testkit import randomize_bn

from acnet_convert import acify, save_weights
from acnet_convert.cli.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SPREAD = '''
from torch import nn


class Spread(nn.Module):
    """Another path for inputs of a large spread, which random inputs of the checks do not have."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if x.std() > 3 else y
'''
UNTRACED = '''
from torch import nn


class Untraced(nn.Module):
    """A BatchNorm that stays after deploy (it follows a ReLU), in code torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x).relu()
        return self.bn(y) if x.mean() > -100 else y
'''
SHARED = '''
from torch import nn


class Twice(nn.Module):
    """One conv without bias called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.conv(self.stem(x)).relu())
'''
LONG_NAMES = """
from torch import nn


class LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_first_stage_convolution = nn.Conv2d(3, 4, 3, padding=1)
        self.encoder_second_stage_convolution = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.encoder_second_stage_convolution(self.encoder_first_stage_convolution(x).relu())
"""


@pytest.fixture
def folder(tmp_path):
    for name, source in (("model", MODEL), ("spread", SPREAD), ("untraced", UNTRACED), ("shared", SHARED),
                         ("long", LONG_NAMES)):  # fmt: skip
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def quiet_acnet(folder, *args, code=0):
    """``acnet`` run with no Python warning escaping it: every warning must have become a ``warning:`` line."""
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        result = acnet(folder, *args, code=code)
    assert [str(w.message) for w in escaped] == []
    assert all(line.startswith(("warning: ", "note: ", "error: ")) for line in result.stderr.splitlines())
    return result


@pytest.mark.parametrize(("flag", "artifact"), [("--torchscript", "s.ts"), ("--onnx", "s.onnx")])
def test_verify_names_tracing_when_a_traced_artifact_differs(folder, flag, artifact):
    acnet(folder, "convert", "spread.py", "--input-shape", "1,3,8,8", "-q")
    refused = quiet_acnet(folder, "export", "spread.py", "-w", "spread.acnet.safetensors", flag, artifact, code=2)
    assert "1 conv(s) decided by the example run" in one_error_line(refused) and "--allow-traced" in (
        one_error_line(refused)
    )
    written = quiet_acnet(folder, "export", "spread.py", "-w", "spread.acnet.safetensors", flag, artifact,
                          "--allow-traced")  # fmt: skip
    assert "only the path the example took" in written.stderr and "traced;" in written.stdout
    assert "and only on those: it holds the path they took" in written.stdout
    torch.save(torch.randn(2, 3, 8, 8) * 5, folder / "spread_out.pt")
    failed = acnet(folder, "verify", "spread.py", "-w", "spread.acnet.safetensors", "--deployed", artifact,
                   "--inputs", "spread_out.pt", "--samples", "1", code=1)  # fmt: skip
    assert (
        f"{artifact} was traced on an example and holds only the path that example took through the model, "
        "which some of these inputs leave" in one_error_line(failed)
    )


def test_quantcheck_warns_in_one_line_and_names_the_flag_that_skips_ptq(folder):
    acnet(folder, "convert", "untraced.py", "--input-shape", "1,3,8,8", "-q")
    failed = quiet_acnet(folder, "quantcheck", "untraced.py", "-w", "untraced.acnet.safetensors", code=2)
    assert "warning: torch.fx cannot trace Untraced" in failed.stderr
    assert "pass --no-ptq" in one_error_line(failed) and "ptq=False" not in failed.stderr
    quiet_acnet(folder, "quantcheck", "untraced.py", "-w", "untraced.acnet.safetensors", "--no-ptq")


def test_convert_allow_empty_prints_no_python_warning(folder):
    quiet_acnet(folder, "convert", "model.py", "--include", "nomatch*", "--allow-empty", "-o", "out.safetensors")


def test_original_format_names_a_shared_conv_and_the_plain_format(folder):
    model = acify(ModelSpec(str(folder / "shared.py")).build(), example_inputs=(torch.randn(1, 3, 8, 8),))
    randomize_bn(model, torch.randn(4, 3, 8, 8))  # trained branches: the fused bias is no longer zero
    save_weights(model, folder / "trained.safetensors")
    failed = acnet(folder, "deploy", "shared.py", "-w", "trained.safetensors", "--format", "original", code=2)
    assert "conv conv is shared (called more than once per forward" in one_error_line(failed)
    assert one_error_line(failed).endswith("use --format plain")


def test_a_plain_state_dict_of_a_python_acify_points_at_save_weights(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # acify's own advice to pass example_inputs
        model = acify(ModelSpec(str(folder / "spread.py")).build())
    torch.save(model.state_dict(), folder / "saved.pt")
    failed = acnet(folder, "deploy", "spread.py", "-w", "saved.pt", code=2)
    assert "write the file with acnet_convert.save_weights(model, path)" in one_error_line(failed)


@pytest.mark.parametrize(("spec", "typo", "meant"), [("torchvision:resnet18", "num_clases", "num_classes"),
                                                    ("timm:resnet18", "drop_rat", "drop_rate")])  # fmt: skip
def test_an_argument_typo_for_a_library_builder_gets_a_suggestion(folder, spec, typo, meant):
    failed = acnet(folder, "inspect", spec, "--arg", f"{typo}=1", code=2)
    assert f"--arg {typo} is not an argument of {spec} (it takes " in one_error_line(failed)
    assert f"did you mean {meant}" in one_error_line(failed)


def test_deploy_creates_the_folders_of_its_output(folder):
    acnet(folder, "convert", "model.py", "--input-shape", "1,3,8,8", "-q")
    acnet(folder, "deploy", "model.py", "-w", "model.acnet.safetensors", "--out", "sub/dir/x.safetensors", "-q")
    assert (folder / "sub" / "dir" / "x.safetensors").is_file()


@pytest.mark.parametrize(("args", "said"), [
    (["verify", "model.py", "-w", "w.safetensors", "--samples", "0"], "'--samples': 0 is less than 1: give 1 or more"),
    (["verify", "model.py", "-w", "w.safetensors", "--samples", "two"], "'--samples': 'two' is not a whole number"),
    (["verify", "model.py", "-w", "w.safetensors", "--deployed", "absent.onnx"],
     "--deployed absent.onnx not found: give the file acnet deploy or acnet export wrote"),
    (["export", "model.py", "-w", "w.safetensors", "--onnx", "a.onnx", "--onnx=b.onnx"],
     "--onnx is given 2 times (--onnx a.onnx, --onnx b.onnx): give it once"),
])  # fmt: skip
def test_bad_values_get_our_words(folder, args, said):
    line = one_error_line(acnet(folder, *args, code=2))
    assert said in line and "Input should" not in line and "checkpoint" not in line


def test_piped_tables_keep_every_name_and_reason_whole(folder):
    acnet(folder, "convert", "long.py", "--input-shape", "1,3,8,8", "-q")
    names = ["encoder_first_stage_convolution", "encoder_second_stage_convolution"]
    tables = [acnet(folder, "inspect", "long.py", env={"COLUMNS": "80"}).stdout,
              acnet(folder, "quantcheck", "long.py", "-w", "long.acnet.safetensors", "--no-ptq",
                    env={"COLUMNS": "80"}).stdout]  # fmt: skip
    for text in tables:
        rows = [line for line in text.splitlines() if line.strip().startswith("encoder_")]
        assert [row.split()[0] for row in rows] == names, text
    reasons = [site["reason"] for site in json.loads(acnet(folder, "inspect", "long.py", "--json").stdout)["sites"]]
    assert all(reason and reason in tables[0] for reason in reasons), (reasons, tables[0])


def test_an_export_failing_on_its_second_format_leaves_no_first_file_and_can_be_retried(folder, monkeypatch):
    acnet(folder, "convert", "model.py", "--input-shape", "1,3,8,8", "-q")

    def failing_trace(*args, **kwargs):
        raise RuntimeError("tracing broke")

    files = ["--pt2", "m.pt2", "--torchscript", "m.ts"]
    with monkeypatch.context() as patch:
        patch.setattr(torch.jit, "trace", failing_trace)
        failed = acnet(folder, "export", "model.py", "-w", "model.acnet.safetensors", *files, code=2)
    assert "TorchScript tracing failed (RuntimeError: tracing broke)" in one_error_line(failed)
    assert not (folder / "m.pt2").exists() and not list(folder.glob(".*.partial"))
    acnet(folder, "export", "model.py", "-w", "model.acnet.safetensors", *files, "-q")
    assert (folder / "m.pt2").is_file() and (folder / "m.ts").is_file()
