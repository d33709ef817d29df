"""The acnet command line, run in process (typer's test runner) and as a real subprocess.

Every command, spec form and bad input runs in process; every command, spec form and the bad inputs
outside ``IN_PROCESS_ONLY`` also run as a subprocess.  The subprocess runs that need no earlier step
start in the background when the module starts (two at a time), so they overlap the rest.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest
import safetensors.torch
import torch
from testkit import command_names
from typer.testing import CliRunner

from acnet_convert import __version__, acify, deploy, plan, verify
from acnet_convert import api as convert_module
from acnet_convert.cli import app
from acnet_convert.cli.options import acify_options
from acnet_convert.cli.spec import ModelSpec
from acnet_convert.files import export as export_module
from acnet_convert.files.checkpoint import metadata, read, write

MODEL = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """conv+BN without bias, a conv alone with bias, conv+BN with bias, and a 1x1 conv that stays as it is."""

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


def small(num_classes=2):
    return Net(width=4, num_classes=num_classes)
'''
ALONE = """
from torch import nn


class Alone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x).relu()
"""
SHAPE = "2,3,16,16"
SPECS = [
    "model.py",
    "model.py:Net",
    "model.py:small",
    "cli_fixture_models.nets:small",
    "torchvision:resnet18",
    "timm:resnet10t",
]
X = torch.randn(2, 3, 16, 16)
SCRIPT = Path(sys.executable).with_name("acnet")
MODES = ["in-process", "subprocess"]
COMMANDS = [name for name in command_names(app) if name != "demo"]  # demo: its own tests


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_process(args, cwd) -> Result:
    """``python -m acnet_convert.cli ARGS`` in a fresh interpreter."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "acnet_convert.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def run_in_process(args, cwd, monkeypatch) -> Result:
    monkeypatch.chdir(cwd)
    done = CliRunner().invoke(app, list(map(str, args)), env={"COLUMNS": "200"})
    return Result(done.exit_code, done.stdout, done.stderr)


def spec_args(spec):
    return ["inspect", spec, "--arg", "num_classes=5", "--json"]


@pytest.fixture(params=MODES)
def acnet(request, tmp_path, monkeypatch):
    """Run acnet in ``tmp_path``, in process or in a subprocess."""
    if request.param == "subprocess":
        return lambda *args: run_process(args, tmp_path)
    return lambda *args: run_in_process(args, tmp_path, monkeypatch)


def ok(result: Result) -> Result:
    assert result.code == 0, result.stderr
    return result


def train(converted: Path, out: Path, spec: ModelSpec, steps: int = 3, mode: str = "exact") -> torch.nn.Module:
    """What a user does between convert and deploy: rebuild, load, train a little, save with the metadata."""
    checkpoint = read(converted)
    model = acify(spec.build(), mode=mode)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 16, 16)).pow(2).mean() + 1e-2 * sum(p.sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    write(out, model.state_dict(), checkpoint.metadata)
    return model.eval()


def write_models(directory: Path) -> None:
    (directory / "model.py").write_text(MODEL)
    (directory / "alone.py").write_text(ALONE)
    package = directory / "cli_fixture_models"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MODEL)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_commands_end_to_end(acnet, tmp_path):
    write_models(tmp_path)
    spec = ModelSpec(str(tmp_path / "model.py"))

    report = json.loads(ok(acnet("inspect", "model.py", "--json")).stdout)
    expected = plan(spec.build())
    assert [s["name"] for s in report["sites"]] == [s.name for s in expected.sites]
    assert [(s["action"], s["bn"]) for s in report["sites"]] == [(s.action, s.bn) for s in expected.sites]
    training, deployed = acify(spec.build()), deploy(acify(spec.build()))
    assert report["parameters"]["training"] == sum(p.numel() for p in training.parameters())
    assert report["parameters"]["deployed"] == sum(p.numel() for p in deployed.parameters())

    output = ok(acnet("convert", "model.py", "--input-shape", SHAPE)).stdout
    assert expected.summary() in output
    assert "check acified vs original" in output and "wrote model.acnet.safetensors" in output
    converted = read(tmp_path / "model.acnet.safetensors")
    assert converted.get("format") == "acified" and converted.get("input_shape") == [2, 3, 16, 16]

    acified = train(tmp_path / "model.acnet.safetensors", tmp_path / "trained.safetensors", spec)
    ok(acnet("deploy", "model.py", "-w", "trained.safetensors", "--out", "plain.safetensors"))
    plain = deploy(acify(spec.build()))
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"), strict=True)
    verify(acified, plain, X, rtol=1e-5)  # max|ref - out| <= 1e-5 * max(1, max|ref|)

    ok(acnet("deploy", "model.py:Net", "-w", "trained.safetensors", "--out", "original.pt", "--format", "original"))
    original = spec.build()
    original.load_state_dict(torch.load(tmp_path / "original.pt", weights_only=True), strict=True)
    verify(acified, original, X, rtol=1e-5)

    output = ok(acnet("verify", "model.py", "-w", "trained.safetensors", "--deployed", "original.pt", "--samples", "3"))
    rows = len(expected.converted) + 2  # every block, the in-memory deployed output and the file's output
    assert "output (original.pt)" in output.stdout and f"all {rows} comparisons within rtol=0.0001" in output.stdout

    ok(acnet("export", "model.py", "-w", "trained.safetensors", "--onnx", "m.onnx", "--torchscript", "m.ts"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: X.numpy()})[0])
    with torch.no_grad():
        want = acified(X)
        scripted = torch.jit.load(tmp_path / "m.ts")(X)
    assert (onnx_out - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())
    assert (scripted - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_version_through_the_installed_script(tmp_path):
    done = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"acnet-convert {__version__}"


def test_version_and_help_in_process():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"acnet-convert {__version__}"
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0 and "Exit codes: 0 success; 1 a check failed" in top.stdout
    for command in COMMANDS:
        page = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert page.exit_code == 0 and "Examples:" in page.stdout and f"acnet {command} " in page.stdout


# ---- bad inputs: each must exit with its code, one line on stderr, and leave no output behind ----


@dataclass
class Bad:
    id: str
    args: list
    code: int
    message: str
    output: str  # the file the command was asked to write


TRAINED = ["-w", "trained.safetensors"]
BAD_INPUTS = [
    Bad(
        "missing-model-file",
        ["convert", "absent.py", "-o", "out.safetensors"],
        2,
        "absent.py not found",
        "out.safetensors",
    ),
    Bad(
        "syntax-error",
        ["convert", "broken.py", "-o", "out.safetensors"],
        2,
        "broken.py line 4: syntax error",
        "out.safetensors",
    ),
    Bad("exception-in-model-file", ["inspect", "raises.py"], 2, "raises.py line 3: RuntimeError: needs a GPU", ""),
    Bad(
        "missing-factory",
        ["convert", "model.py:build", "-o", "out.safetensors"],
        2,
        "model.py has no 'build'; it defines Net, small",
        "out.safetensors",
    ),
    Bad(
        "wrong-shapes",
        ["deploy", "model.py", *TRAINED, "--arg", "width=4", "-o", "out.safetensors"],
        2,
        "trained.safetensors does not fit the model",
        "out.safetensors",
    ),
    Bad(
        "truncated-checkpoint",
        ["deploy", "model.py", "-w", "truncated.safetensors", "-o", "out.safetensors"],
        2,
        "truncated.safetensors is not a valid safetensors file",
        "out.safetensors",
    ),
    Bad(
        "truncated-pt",
        ["deploy", "model.py", "-w", "truncated.pt", "-o", "out.safetensors"],
        2,
        "truncated.pt is not a readable PyTorch or safetensors checkpoint",
        "out.safetensors",
    ),
    Bad("not-a-checkpoint", ["verify", "model.py", "-w", "model.py"], 2, "model.py is not a readable PyTorch", ""),
    Bad(
        "pickle-needing-code",
        ["deploy", "model.py", "-w", "pickled.pt", "-o", "out.safetensors"],
        2,
        "refused for safety",
        "out.safetensors",
    ),
    Bad(
        "bad-input-shape",
        ["export", "model.py", *TRAINED, "--onnx", "out.onnx", "--input-shape", "1,3,x"],
        2,
        "bad --input-shape '1,3,x'",
        "out.onnx",
    ),
    Bad(
        "input-shape-the-model-rejects",
        ["export", "model.py", *TRAINED, "--onnx", "out.onnx", "--input-shape", "1,5,16,16"],
        2,
        "failed on a random input of shape 1x5x16x16",
        "out.onnx",
    ),
    Bad(
        "existing-output",
        ["deploy", "model.py", *TRAINED, "-o", "existing.safetensors"],
        2,
        "existing.safetensors already exists: pass --force",
        "existing.safetensors",
    ),
    Bad(
        "unrepresentable-original",
        ["deploy", "alone.py", "-w", "alone.safetensors", "-o", "out.pt", "--format", "original"],
        2,
        "conv has no bias and no BatchNorm after it",
        "out.pt",
    ),
    Bad(
        "verification-mismatch",
        ["verify", "model.py", *TRAINED, "--deployed", "tampered.safetensors"],
        1,
        "exceed rtol=0.0001",
        "",
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with every file the bad-input cases need."""
    folder = tmp_path_factory.mktemp("inputs")
    write_models(folder)
    (folder / "broken.py").write_text("import torch\n\n\nclass Net(torch.nn.Module:\n    pass\n")
    (folder / "raises.py").write_text("import torch\n\nraise RuntimeError('needs a GPU')\n")
    spec = ModelSpec(str(folder / "model.py"))
    acified = acify(spec.build())
    recorded = metadata("acified", spec="model.py", args=(), options=acify_options({}), input_shape=(1, 3, 16, 16))
    write(folder / "converted.safetensors", acified.state_dict(), recorded)  # as written before plans were recorded
    acified = train(folder / "converted.safetensors", folder / "trained.safetensors", spec)
    (folder / "truncated.safetensors").write_bytes((folder / "trained.safetensors").read_bytes()[:1000])
    torch.save(acified.state_dict(), folder / "full.pt")
    (folder / "truncated.pt").write_bytes((folder / "full.pt").read_bytes()[:3000])
    torch.save({"model": acified}, folder / "pickled.pt")
    (folder / "existing.safetensors").write_bytes(b"precious")
    tampered = deploy(acified).state_dict()
    tampered["conv1.bias"] = tampered["conv1.bias"] + 1.0
    write(folder / "tampered.safetensors", tampered)
    alone = acify(ModelSpec(str(folder / "alone.py")).build())
    with torch.no_grad():
        alone.conv.branches["hor"].bn.bias.fill_(0.5)  # as after training: the fused bias is no longer zero
    write(folder / "alone.safetensors", alone.state_dict())
    return folder


IN_PROCESS_ONLY = {"truncated-pt", "pickle-needing-code", "input-shape-the-model-rejects", "unrepresentable-original"}
CHAIN_SPECS = {"model.py", "model.py:Net"}  # run as a subprocess by test_commands_end_to_end already
BAD_CASES = [
    pytest.param(case, mode, id=f"{case.id}-{mode}")
    for case in BAD_INPUTS
    for mode in MODES
    if mode == "in-process" or case.id not in IN_PROCESS_ONLY
]
SPEC_CASES = [
    pytest.param(spec, mode, id=f"{spec}-{mode}")
    for spec in SPECS
    for mode in MODES
    if mode == "in-process" or spec not in CHAIN_SPECS
]


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """The selected subprocess runs of the bad-input and spec-form tests, started now, each in its own folder."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for case in BAD_INPUTS:
            if f"{case.id}-subprocess" in selected:
                folder = tmp_path_factory.mktemp(case.id)
                shutil.copytree(request.getfixturevalue("inputs"), folder, dirs_exist_ok=True)
                jobs[case.id] = (folder, pool.submit(run_process, case.args, folder))
        for spec in SPECS:
            if f"{spec}-subprocess" in selected:
                folder = tmp_path_factory.mktemp("spec")
                write_models(folder)
                jobs[spec] = (folder, pool.submit(run_process, spec_args(spec), folder))
        yield jobs


@pytest.mark.parametrize(("case", "mode"), BAD_CASES)
def test_bad_input(case, mode, background, inputs, tmp_path, monkeypatch):
    if mode == "subprocess":
        folder, job = background[case.id]
        result = job.result()
    else:
        folder = tmp_path
        shutil.copytree(inputs, folder, dirs_exist_ok=True)
        result = run_in_process(case.args, folder, monkeypatch)
    assert result.code == case.code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr  # one line
    assert case.message in result.stderr
    if case.output == "existing.safetensors":
        assert (folder / case.output).read_bytes() == b"precious"
    elif case.output:
        assert not (folder / case.output).exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def test_fast_mode_is_stored_and_deploys_to_the_original_layout(tmp_path, monkeypatch):
    write_models(tmp_path)
    spec = ModelSpec(str(tmp_path / "model.py"))
    ok(run_in_process(["convert", "model.py", "--mode", "fast", "--input-shape", SHAPE], tmp_path, monkeypatch))
    assert read(tmp_path / "model.acnet.safetensors").get("options")["mode"] == "fast"
    acified = train(tmp_path / "model.acnet.safetensors", tmp_path / "trained.safetensors", spec, mode="fast")
    args = ["deploy", "model.py", *TRAINED, "-o", "deployed.pt", "--format", "original"]
    ok(run_in_process(args, tmp_path, monkeypatch))  # the mode comes from the checkpoint's metadata
    original = spec.build()
    original.load_state_dict(torch.load(tmp_path / "deployed.pt", weights_only=True), strict=True)
    verify(acified, original, X, rtol=1e-5)


DYNAMIC = """
from torch import nn


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # depends on the data: torch.fx cannot trace this
            x = x.flip(-1)
        return self.bn(self.conv(x)).relu()
"""


def test_code_torch_fx_cannot_trace_is_analysed_on_an_example_input(tmp_path, monkeypatch):
    (tmp_path / "dynamic.py").write_text(DYNAMIC)
    report = json.loads(
        ok(
            run_in_process(["inspect", "dynamic.py", "--input-shape", "1,3,8,8", "--json"], tmp_path, monkeypatch)
        ).stdout
    )
    assert report["trace_failures"] and [(s["action"], s["bn"]) for s in report["sites"]] == [("convert", "bn")]
    ok(
        run_in_process(
            ["convert", "dynamic.py", "--input-shape", "1,3,8,8", "-o", "d.safetensors"], tmp_path, monkeypatch
        )
    )
    args = ["deploy", "dynamic.py", "-w", "d.safetensors", "-o", "d.pt", "--format", "original"]
    ok(run_in_process(args, tmp_path, monkeypatch))  # rebuilt with the stored input shape: the same structure
    bad = run_in_process(["inspect", "dynamic.py", "--input-shape", "1,2,8,8"], tmp_path, monkeypatch)
    assert bad.code == 2 and "failed on a random input of shape 1x2x8x8" in bad.stderr


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    result = run_in_process(["inspect", "absent.py", "--debug"], tmp_path, monkeypatch)
    assert result.code == 2 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: model file absent.py not found")


def test_unexpected_errors_exit_3_with_one_line(tmp_path, monkeypatch):
    write_models(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(convert_module, "deploy", broken)
    result = run_in_process(["inspect", "model.py"], tmp_path, monkeypatch)
    assert result.code == 3
    assert (
        result.stderr
        == "error: unexpected RuntimeError: something inside broke (rerun with --debug for the traceback)\n"
    )


def test_failed_onnx_export_leaves_no_file(inputs, tmp_path, monkeypatch):
    shutil.copytree(inputs, tmp_path, dirs_exist_ok=True)

    def half_written(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    result = run_in_process(["export", "model.py", *TRAINED, "--onnx", "m.onnx"], tmp_path, monkeypatch)
    assert result.code == 2 and "ONNX export failed (RuntimeError: unsupported operator)" in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*.partial"))


def test_onnx_mismatch_exits_1_and_leaves_no_file(inputs, tmp_path, monkeypatch):
    shutil.copytree(inputs, tmp_path, dirs_exist_ok=True)

    class Wrong(torch.nn.Module):
        metadata: dict = {}  # noqa: RUF012

        def __init__(self, path):
            super().__init__()

        def forward(self, x):
            return torch.zeros(x.shape[0], 3) + 10.0

    monkeypatch.setattr(export_module, "OnnxModel", Wrong)
    result = run_in_process(["export", "model.py", *TRAINED, "--onnx", "m.onnx"], tmp_path, monkeypatch)
    assert result.code == 1 and "exceeds rtol=0.0001" in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".*.partial"))


def test_force_overwrites(inputs, tmp_path, monkeypatch):
    shutil.copytree(inputs, tmp_path, dirs_exist_ok=True)
    result = run_in_process(
        ["deploy", "model.py", *TRAINED, "-o", "existing.safetensors", "--force"], tmp_path, monkeypatch
    )
    assert result.code == 0, result.stderr
    assert read(tmp_path / "existing.safetensors").get("format") == "plain"


def test_acify_warnings_become_one_line_notes(tmp_path, monkeypatch):
    write_models(tmp_path)
    result = run_in_process(["inspect", "model.py", "--include", "nothing.*"], tmp_path, monkeypatch)
    assert result.code == 0 and result.stderr.startswith("warning: include pattern 'nothing.*' matches no ")
    assert result.stderr.count("\n") == 1  # one line, however long the library's message


@pytest.mark.parametrize(("spec", "mode"), SPEC_CASES)
def test_every_spec_form(spec, mode, background, tmp_path, monkeypatch):
    if mode == "subprocess":
        folder, job = background[spec]
        report = json.loads(ok(job.result()).stdout)
    else:
        folder = tmp_path
        write_models(folder)
        report = json.loads(ok(run_in_process(spec_args(spec), folder, monkeypatch)).stdout)
    monkeypatch.chdir(folder)
    model = ModelSpec(spec, ("num_classes=5",)).build()
    assert report["summary"] == plan(model).summary()
    assert report["parameters"]["original"] == sum(p.numel() for p in model.parameters())
