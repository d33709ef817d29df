"""The acnet command line from training to deployment: exported artifacts, several inputs, user block kinds, --json.

Commands run in process (typer's test runner) in one folder per module, in the order a user runs them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from testkit import command_names
from typer.testing import CliRunner

from acnet_convert import deploy, load, save_weights
from acnet_convert.cli import app
from acnet_convert.cli.spec import ModelSpec
from acnet_convert.constants import BUILTIN_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, width=8, num_classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(self.proj(x).mean((2, 3)))
'''
TWO_INPUTS = """
from torch import nn


class Masked(nn.Module):
    '''An image and a mask in; a dict of logits and a score out.'''

    def __init__(self):
        super().__init__()
        self.image, self.bn_image = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.mask, self.bn_mask = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, image, mask):
        x = self.bn_image(self.image(image)).relu() * self.bn_mask(self.mask(mask)).sigmoid()
        return {"logits": self.head(x), "score": x.mean((1, 2, 3))}
"""
OWN_KIND = '''
from torch import nn

import acnet_convert
from acnet_convert.blocks.acb import ACBlock


class CrossBlock(ACBlock):
    """ACB's branches under a kind of its own, for square kernels only."""

    kind = "cross"

    @classmethod
    def conv_problem(cls, conv, layout="lines"):
        if conv.kernel_size[0] != conv.kernel_size[1]:
            return "cross needs a square kernel"
        return super().conv_problem(conv, layout)


acnet_convert.register_block("cross", CrossBlock)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())).relu()
'''
SHAPE = ["--input-shape", "2,3,16,16"]
ACNET = Path(sys.executable).with_name("acnet")


def acnet(folder, *args, code=0, env=None):
    """Run acnet in ``folder`` in process (``env`` added to its environment); check the exit code; return the
    result."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, list(map(str, args)), env={"COLUMNS": "200", **(env or {})})
    finally:
        os.chdir(cwd)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def one_error_line(result) -> str:
    """The one ``error:`` line of a failed run: the last line of stderr (warning lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert all(line.startswith(("error: ", "warning: ", "note: ")) for line in lines), result.stderr
    return lines[-1]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


def train(folder: Path, spec: str, source: str, target: str, perturb: bool = False) -> torch.nn.Module:
    """A training script's part: rebuild with load, train a few steps, save with save_weights."""
    model = load(ModelSpec(str(folder / spec)).build(), folder / source)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 16, 16)).pow(2).mean() + 1e-2 * sum(p.sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if perturb:
        with torch.no_grad():
            model.head.bias.add_(0.5)
    save_weights(model, folder / target)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model.py converted, trained, and exported to every format; the same for a perturbed copy of the weights."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "model.py").write_text(MODEL)
    acnet(folder, "convert", "model.py", *SHAPE)
    train(folder, "model.py", "model.acnet.safetensors", "trained.safetensors")
    train(folder, "model.py", "model.acnet.safetensors", "perturbed.safetensors", perturb=True)
    for name in ("trained", "perturbed"):
        acnet(folder, "export", "model.py", "-w", f"{name}.safetensors", *SHAPE, "--onnx", f"{name}.onnx",
              "--pt2", f"{name}.pt2", "--torchscript", f"{name}.ts", "-q")  # fmt: skip
    return folder


def deployed_model(folder: Path) -> torch.nn.Module:
    return deploy(load(ModelSpec(str(folder / "model.py")).build(), folder / "trained.safetensors")).eval()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_exported_at_batch_2_runs_at_other_batch_sizes(trained, batch):
    session = onnxruntime.InferenceSession(str(trained / "trained.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    x = torch.randn(batch, 3, 16, 16)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        assert relative(got, deployed_model(trained)(x)) <= 1e-4


@pytest.mark.parametrize("batch", [1, 5])
def test_pt2_exported_at_batch_2_runs_at_other_batch_sizes(trained, batch):
    program = torch.export.load(trained / "trained.pt2").module()
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        assert relative(program(x), deployed_model(trained)(x)) <= 1e-4


def test_export_says_each_file_equals_the_deployed_model(trained, tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / "trained.safetensors").write_bytes((trained / "trained.safetensors").read_bytes())
    text = acnet(tmp_path, "export", "model.py", "-w", "trained.safetensors", *SHAPE, "--onnx", "m.onnx",
                 "--opset", "18", "--static-shape").stdout  # fmt: skip
    assert "check onnxruntime (m.onnx) vs deployed on the example (batch 2)" in text and "batch fixed" in text
    assert "equals the deployed model within rtol=0.0001 on the example (batch 2), the example negated (batch 2) " \
        "and random inputs (batch 2)" in text
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 16, 16]


@pytest.mark.parametrize("artifact", ["onnx", "pt2", "ts"])
def test_verify_checks_an_exported_artifact(trained, artifact):
    result = acnet(trained, "verify", "model.py", "-w", "trained.safetensors", "--deployed", f"trained.{artifact}",
                   "--samples", "2", *SHAPE, "--json")  # fmt: skip
    report = json.loads(result.stdout)
    assert report["ok"] and f"output (trained.{artifact})" in [check["label"] for check in report["checks"]]
    failed = acnet(trained, "verify", "model.py", "-w", "trained.safetensors", "--deployed", f"perturbed.{artifact}",
                   "--samples", "2", *SHAPE, code=1)  # fmt: skip
    assert f"worst: output (perturbed.{artifact})" in one_error_line(failed)
    wrong_weights = f"perturbed.{artifact} differs on every input: it does not hold the model trained.safetensors"
    assert wrong_weights in one_error_line(failed)


def test_verify_compares_a_plain_model_with_its_artifact_on_real_inputs(trained, tmp_path):
    torch.save(torch.randn(3, 3, 16, 16), tmp_path / "batch.pt")
    plain = tmp_path / "plain.safetensors"
    acnet(trained, "deploy", "model.py", "-w", "trained.safetensors", "-o", plain, "-q")
    text = acnet(trained, "verify", "model.py", "-w", plain, "--deployed", "trained.onnx", "--inputs",
                 tmp_path / "batch.pt", "--samples", "1").stdout  # fmt: skip
    assert "and the inputs" in text and "all 1 comparisons within rtol=0.0001" in text


def test_a_model_with_two_inputs_from_convert_to_export(tmp_path):
    (tmp_path / "masked.py").write_text(TWO_INPUTS)
    shapes = ["--input-shape", "2,3,16,16", "--input-shape", "2,1,16,16"]
    acnet(tmp_path, "convert", "masked.py", *shapes, "-q")
    acnet(tmp_path, "deploy", "masked.py", "-w", "masked.acnet.safetensors", "-q")
    torch.save((torch.randn(3, 3, 16, 16), torch.rand(3, 1, 16, 16)), tmp_path / "real.pt")
    report = json.loads(acnet(tmp_path, "export", "masked.py", "-w", "masked.acnet.safetensors", "--onnx", "m.onnx",
                              "--pt2", "m.pt2", "--inputs", "real.pt", "--json").stdout)  # fmt: skip
    onnx_entry = next(entry for entry in report["files"] if entry["kind"] == "onnx")
    assert onnx_entry["inputs"] == ["input_0", "input_1"] and onnx_entry["outputs"] == ["logits", "score"]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    image, mask = torch.randn(1, 3, 16, 16), torch.rand(1, 1, 16, 16)
    logits, score = session.run(None, {"input_0": image.numpy(), "input_1": mask.numpy()})
    model = deploy(load(ModelSpec(str(tmp_path / "masked.py")).build(), tmp_path / "masked.acnet.safetensors"))
    with torch.no_grad():
        want = model.eval()(image, mask)
    assert relative(torch.from_numpy(logits), want["logits"]) <= 1e-4
    assert relative(torch.from_numpy(score), want["score"]) <= 1e-4
    acnet(tmp_path, "verify", "masked.py", "-w", "masked.acnet.safetensors", "--deployed", "m.pt2", "--inputs",
          "real.pt", "--samples", "1", "-q")  # fmt: skip


def test_a_block_kind_registered_by_the_model_file_end_to_end(tmp_path):
    (tmp_path / "own.py").write_text(OWN_KIND)
    report = json.loads(acnet(tmp_path, "inspect", "own.py", "--block", "cross", "--json").stdout)
    assert [site["kind"] for site in report["sites"]] == ["cross", "cross"]
    text = acnet(tmp_path, "inspect", "own.py", "--block", "conv2=cross", "--block", "acb").stdout
    assert "cross exact" in text and "acb exact" in text
    acnet(tmp_path, "convert", "own.py", "--block", "conv1=cross", "--input-shape", "1,3,8,8", "-q")
    acnet(tmp_path, "deploy", "own.py", "-w", "own.acnet.safetensors", "-q")
    text = acnet(tmp_path, "verify", "own.py", "-w", "own.acnet.safetensors", "--deployed", "own.deployed.safetensors",
                 "--samples", "2").stdout  # fmt: skip
    assert "all 4 comparisons within" in text


# ---- help, choices and usage errors ----

COMMANDS = command_names(app)
CHOICES = {"--mode": ("exact", "fast", "repopt"), "--init": ("preserve", "scratch"), "--format": ("plain", "original"),
           "--device": ("cpu", "cuda")}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_choices_and_shows_no_bool(command, tmp_path):
    text = acnet(tmp_path, command, "--help").stdout
    assert "<bool>" not in text and "Examples:" in text
    assert not [line for line in text.splitlines() if " --" in line and "<str>" in line]  # options say what they take
    for option, values in CHOICES.items():
        if option in text:
            assert "|".join(values) in text, option
    if command in ("inspect", "convert"):
        assert all(kind in text for kind in BUILTIN_KINDS)


def test_help_of_the_group_shows_no_bool(tmp_path):
    text = acnet(tmp_path, "--help").stdout
    assert "<bool>" not in text and "quantcheck" in text and "--install-completion" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "model.py", "--mode", "slow"], "error: invalid value for '--mode': 'slow' is not one of 'exact', "
         "'fast', 'repopt' (try: acnet convert --help)"),
        (["deploy", "model.py", "-w", "x.safetensors", "--format", "onnx"], "'onnx' is not one of 'plain', 'original'"),
        (["deploy"], "error: missing argument 'SPEC' (try: acnet deploy --help)"),
        (["convert", "model.py", "--rtol", "-1"], "invalid value for '--rtol': -1 is not a positive number"),
        (["verify", "model.py", "-w", "x", "--samples", "0"], "invalid value for '--samples'"),
        (["export", "model.py", "-w", "x", "--onnx", "m.onnx", "--opset", "3"], "invalid value for '--opset'"),
        (["inspect", "model.py", "--bogus"], "no such option: --bogus"),
        (["convert", "model.py", "--min-kernel", "0"], "invalid value for '--min-kernel'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, tmp_path):
    assert message in one_error_line(acnet(tmp_path, *args, code=2))
    assert not [p for p in tmp_path.iterdir()]  # nothing written


def test_usage_error_through_the_installed_script(tmp_path):
    done = subprocess.run([str(ACNET), "convert", "model.py", "--init", "warm"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: invalid value for '--init': 'warm' is not one of 'preserve', 'scratch' (try: acnet convert --help)"
    ]


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_answer_without_importing_torch(args):
    # What keeps them fast is that torch is never imported (their time is measured in the closing figures, not here).
    probe = (
        "import sys\nfrom acnet_convert.cli import app\n"
        f"try:\n    app({args!r}, prog_name='acnet')\nexcept SystemExit as done:\n    assert not done.code\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() and done.stderr.strip() == "False", done.stderr


def test_shell_completion_completes_commands_and_choices(tmp_path):
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_ACNET_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (not words.endswith(" ")))}  # fmt: skip
        return subprocess.run([str(ACNET)], env=env, capture_output=True, text=True, timeout=60).stdout.split()

    assert complete("acnet quant") == ["quantcheck"]
    from acnet_convert.constants import MODES

    assert complete("acnet convert m.py --mode ") == list(MODES)
    # "; true" keeps bash running as acnet's parent (bash -c would exec a lone command), so bash is detected
    shown = subprocess.run(["bash", "-c", f"{ACNET} --show-completion; true"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert "_ACNET_COMPLETE" in shown.stdout


def test_the_choices_and_defaults_of_the_command_line_are_the_librarys():
    import inspect
    import typing

    import typer

    from acnet_convert import acify
    from acnet_convert.blocks import kinds
    from acnet_convert.cli.options import acify_options
    from acnet_convert.constants import DEVICES, FILE_FORMATS, INITS, MODES
    from acnet_convert.demo import DEFAULT_EPOCHS

    params = {(name, p.name): p for name, c in typer.main.get_command(app).commands.items() for p in c.params}

    def choices(command: str, name: str) -> tuple:
        return typing.get_args(params[command, name].type_descriptor.annotation)

    for command in ("inspect", "convert", "deploy", "verify", "export"):
        assert choices(command, "mode") == MODES and choices(command, "device") == DEVICES
    assert choices("convert", "init") == INITS
    assert choices("deploy", "fmt") == tuple(f for f in FILE_FORMATS if f != "acified")
    assert params["demo", "epochs"].default == DEFAULT_EPOCHS
    assert all(kind in params["convert", "block"].help for kind in kinds())
    defaults = inspect.signature(acify).parameters
    assert params["convert", "gamma_init"].default == defaults["gamma_init"].default
    assert params["convert", "init"].default == defaults["init"].default
    assert acify_options({}) == {name: defaults[name].default for name in acify_options({})}


# ---- --json and --quiet ----


def test_json_of_every_command(trained, tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    inspect = json.loads(acnet(tmp_path, "inspect", "model.py", "--json").stdout)
    assert inspect["command"] == "inspect" and inspect["ok"] and inspect["parameters"]["original"] > 0
    site = inspect["sites"][1]
    assert site["name"] == "conv2" and site["code"] == "no-batchnorm-after" and site["kind"] == "acb"
    convert = json.loads(acnet(tmp_path, "convert", "model.py", *SHAPE, "--json").stdout)
    assert convert["files"] == [{"path": "model.acnet.safetensors", "kind": "acified"}]
    assert [c["label"] for c in convert["checks"]] == ["acified vs original", "deployed vs acified"]
    assert all({"max_abs", "relative", "rtol", "passed"} <= set(c) for c in convert["checks"])
    assert [s["code"] for s in convert["sites"]] == ["", "no-batchnorm-after", "", "block-unsupported"]
    deploy_ = json.loads(acnet(tmp_path, "deploy", "model.py", "-w", "model.acnet.safetensors", "--json").stdout)
    assert deploy_["files"][0]["kind"] == "plain" and deploy_["quant_summary"].startswith("worst layer")
    verify_ = json.loads(acnet(tmp_path, "verify", "model.py", "-w", "model.acnet.safetensors", "--samples", "1",
                               "--json").stdout)  # fmt: skip
    assert len(verify_["checks"]) == 4 and all(c["passed"] for c in verify_["checks"])
    export = json.loads(acnet(tmp_path, "export", "model.py", "-w", "model.acnet.safetensors", "--pt2", "m.pt2",
                              "--json").stdout)  # fmt: skip
    assert export["files"][0]["dynamic_batch"] and not export["files"][0]["traced"] and len(export["checks"]) == 4
    assert export["files"][0]["checked_on"] == ["the example (batch 2)", "the example negated (batch 2)",
                                                "random inputs (batch 1)"]  # fmt: skip
    quant = json.loads(acnet(tmp_path, "quantcheck", "model.py", "-w", "model.deployed.safetensors", "--no-ptq",
                             "--json").stdout)  # fmt: skip
    assert quant["command"] == "quantcheck" and quant["ptq"] is None and len(quant["layers"]) == 5


def test_json_of_the_demo(tmp_path):
    demo = json.loads(acnet(tmp_path, "demo", "--epochs", "1", "--out-dir", tmp_path, "--json").stdout)
    assert demo["command"] == "demo" and demo["predictions_equal"] and demo["epochs"] == 1


def test_json_on_failure_carries_the_error(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    failed = acnet(tmp_path, "convert", "model.py", "--include", "nomatch*", "--json", code=1)
    report = json.loads(failed.stdout)
    assert not report["ok"] and report["exit_code"] == 1 and "no conv was converted" in report["error"]
    assert {site["code"] for site in report["sites"]} == {"not-included"}


def test_quiet_prints_nothing_on_success(trained, tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    for args in (["convert", "model.py", *SHAPE], ["deploy", "model.py", "-w", "model.acnet.safetensors"],
                 ["verify", "model.py", "-w", "model.acnet.safetensors", "--samples", "1"],
                 ["inspect", "model.py"]):  # fmt: skip
        result = acnet(tmp_path, *args, "--quiet")
        assert result.stdout == "" and result.stderr == "", args
