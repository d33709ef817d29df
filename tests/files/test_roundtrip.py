"""The round trip between steps: the plan recorded in checkpoints, load, original_state_dict, aliases, guard rails."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from roundtrip import calibrate_bn
from torch import nn
from typer.testing import CliRunner

from acnet_convert import ACBlock, ACNetError, acify, deploy, load, original_state_dict, plan, save_weights, verify
from acnet_convert.cli import app
from acnet_convert.files.checkpoint import metadata, read, write

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Dyn(nn.Module):
    """Whether conv feeds bn depends on the data, so on the random initial weights of stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        if h.mean() > 0:
            h = self.bn(self.conv(h))
        else:
            h = self.conv(h) * 0.5
        return self.head(F.relu(h))


class UNet(nn.Module):
    """A small U-Net whose input check torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec, self.bn3 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError("the U-Net needs even input sizes")
        e1 = F.relu(self.bn1(self.enc1(x)))
        e2 = F.relu(self.bn2(self.enc2(e1)))
        d = F.relu(self.bn3(self.dec(torch.cat([self.up(e2), e1], 1))))
        return self.head(d)
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The module above, written to a file (for the command line) and imported (for Python)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "models.py").write_text(MODELS)
    namespace: dict = {}
    exec(compile(MODELS, str(folder / "models.py"), "exec"), namespace)
    return folder / "models.py", namespace


def acnet(*args, codes=(0,)):
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code in codes, result.stderr
    return result


def train_steps(model, x, steps=3, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(x).float().pow(2).mean() + 1e-2 * sum(p.sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_data_dependent_branch_round_trips_on_the_command_line_for_every_initialisation(models, tmp_path):
    path, _ = models
    spec, shape = f"{path}:Dyn", ["--input-shape", "2,3,8,8"]
    absorbed = set()
    for run in range(5):  # every command builds the model afresh, with new random weights
        acified, deployed = tmp_path / f"a{run}.safetensors", tmp_path / f"d{run}.safetensors"
        acnet("convert", spec, *shape, "--out", acified)
        absorbed.add(read(acified).plan.converted[1].bn)
        acnet("deploy", spec, "-w", acified, "--out", deployed)
        acnet("verify", spec, "-w", acified, "--deployed", deployed, "--samples", "2")
        onnx_file = tmp_path / f"m{run}.onnx"
        refused = acnet("export", spec, "-w", acified, "--onnx", onnx_file, codes=(2,))
        assert "decided by the example run" in refused.stderr and "--allow-traced" in refused.stderr
        result = acnet("export", spec, "-w", acified, "--onnx", onnx_file, "--allow-traced", codes=(0, 1))
        assert "torch.export could not capture the model" in result.stderr
        assert "only the path the example took" in result.stderr
        if result.exit_code:  # the negated or the random input took the other branch
            assert "the file was traced" in result.stderr and not onnx_file.exists()
        else:
            assert onnx_file.exists() and "traced" in result.stdout
    assert absorbed <= {"bn", None}


def test_data_dependent_branch_round_trips_in_python_and_the_report_says_what_the_input_decided(models, tmp_path):
    _, namespace = models
    x = torch.randn(2, 3, 8, 8)
    for seed in range(5):
        torch.manual_seed(seed)
        acified = acify(namespace["Dyn"](), example_inputs=(x,))
        assert "conv" in acified.acnet_plan.input_dependent
        assert "decided by the example run" in acified.acnet_plan.summary()
        save_weights(train_steps(acified, x), tmp_path / "dyn.safetensors")
        torch.manual_seed(seed + 100)  # a fresh model that may take the other path on x: the file decides
        rebuilt = load(namespace["Dyn"](), tmp_path / "dyn.safetensors")
        verify(acified, rebuilt, x, rtol=0.0)  # the same weights in the same structure: identical outputs


def test_plan_is_deterministic_for_the_same_model_and_inputs(models):
    _, namespace = models
    model, x = namespace["Dyn"](), torch.randn(2, 3, 8, 8)
    first = plan(model, example_inputs=(x,)).to_dict()
    assert all(plan(model, example_inputs=(x,)).to_dict() == first for _ in range(3))


def test_unet_round_trip_in_python_and_on_the_command_line(models, tmp_path):
    path, namespace = models
    spec, shape = f"{path}:UNet", ["--input-shape", "2,3,16,16"]
    acnet("convert", spec, *shape, "--out", tmp_path / "a.safetensors")
    model = load(namespace["UNet"](), tmp_path / "a.safetensors")  # no example input needed: the plan is recorded
    assert model.acnet_origin == {"spec": spec, "args": [], "input_shape": [2, 3, 16, 16]}  # written back on save
    assert [s.bn for s in model.acnet_plan.converted] == ["bn1", "bn2", "bn3"]  # up (2x2) has no centre line
    x = torch.randn(2, 3, 16, 16)
    save_weights(train_steps(model, x), tmp_path / "trained.safetensors")
    acnet("deploy", spec, "-w", tmp_path / "trained.safetensors", "--out", tmp_path / "plain.safetensors")
    acnet("deploy", spec, "-w", tmp_path / "trained.safetensors", "--out", tmp_path / "orig.pt", "--format", "original")
    acnet("verify", spec, "-w", tmp_path / "trained.safetensors", "--deployed", tmp_path / "plain.safetensors")
    acnet("export", spec, "-w", tmp_path / "trained.safetensors", "--onnx", tmp_path / "u.onnx")
    plain = load(namespace["UNet"](), tmp_path / "plain.safetensors")
    assert not any(isinstance(m, ACBlock) for m in plain.modules()) and isinstance(plain.bn1, nn.Identity)
    original = namespace["UNet"]()
    original.load_state_dict(torch.load(tmp_path / "orig.pt", weights_only=True), strict=True)  # a bare state_dict
    model.eval()
    verify(model, plain, x, rtol=1e-5)  # relative to max(1, max|ref|)
    verify(model, original, x, rtol=1e-5)


def test_resnet18_round_trip_through_load_in_every_format(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    acified = acify(torchvision.models.resnet18(num_classes=10))
    train_steps(acified, x, steps=2, lr=0.01)
    calibrate_bn(acified, (x,))
    for fmt in ("acified", "plain", "original"):
        save_weights(acified, tmp_path / f"{fmt}.safetensors", fmt)
        rebuilt = load(torchvision.models.resnet18(num_classes=10), tmp_path / f"{fmt}.safetensors").eval()
        assert sum(isinstance(m, ACBlock) for m in rebuilt.modules()) == (17 if fmt == "acified" else 0)
        verify(acified, rebuilt, x, rtol=1e-5)  # relative to max(1, max|ref|)


def test_timm_batchnormact_model_writes_original_weights_after_training(tmp_path):
    timm = pytest.importorskip("timm")
    spec, shape = "timm:mobilenetv3_small_050", ["--input-shape", "2,3,32,32"]
    build = lambda: timm.create_model("mobilenetv3_small_050", pretrained=False)  # noqa: E731
    acnet("convert", spec, *shape, "--out", tmp_path / "a.safetensors")
    model = load(build(), tmp_path / "a.safetensors")
    x = torch.randn(4, 3, 32, 32)
    train_steps(model, x, steps=2, lr=0.01)
    calibrate_bn(model, (x,))
    fresh = build()
    absorbed = [s for s in model.acnet_plan.converted if s.bn]
    assert absorbed and all(type(fresh.get_submodule(s.bn)).__name__ == "BatchNormAct2d" for s in absorbed)
    deployed = deploy(model)
    assert all(deployed.get_submodule(s.name).bias.abs().max() > 0 for s in absorbed)  # the fused biases are nonzero
    save_weights(model, tmp_path / "trained.safetensors")
    acnet("deploy", spec, "-w", tmp_path / "trained.safetensors", "--out", tmp_path / "o.safetensors",
          "--format", "original")  # fmt: skip
    for state in (original_state_dict(model), safetensors.torch.load_file(tmp_path / "o.safetensors")):
        fresh = build()
        fresh.load_state_dict(state, strict=True)
        verify(model, fresh, x, rtol=1e-5)  # eval outputs, relative to max(1, max|ref|)


class NormThenReLU(nn.BatchNorm2d):
    """A BatchNorm subclass with an activation inside and no adapter: never absorbed."""

    def forward(self, x):
        return F.relu(super().forward(x))


def test_a_fused_bias_goes_into_the_running_mean_of_a_batchnorm_that_alone_follows_the_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), NormThenReLU(8), nn.Conv2d(8, 2, 3))
    x = torch.randn(4, 3, 8, 8)
    acified = train_steps(acify(model, init="scratch"), x).eval()
    site = acified.acnet_plan.converted[0]
    assert (site.bn, site.bn_after) == (None, "1") and deploy(acified)[0].bias.abs().max() > 0
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), NormThenReLU(8), nn.Conv2d(8, 2, 3))
    fresh.load_state_dict(original_state_dict(acified), strict=True)
    verify(acified, fresh, x, rtol=1e-5)  # BN(z + b) = BN(z) with running_mean - b


class HardNetLike(nn.Module):
    """A patch descriptor in the style of kornia's HardNet: bias-free convs, each before a BatchNorm without affine
    parameters, and an L2-normalised output."""

    def __init__(self):
        super().__init__()
        layers = []
        for cin, cout, stride in ((1, 8, 1), (8, 8, 1), (8, 16, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, affine=False), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Conv2d(16, 16, 4, bias=False), nn.BatchNorm2d(16, affine=False))

    def forward(self, x):
        return F.normalize(self.features(x).flatten(1), dim=1)


def test_a_fused_bias_goes_into_minus_the_running_mean_of_an_absorbed_batchnorm_without_affine(tmp_path):
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    acified = train_steps(acify(HardNetLike().double(), init="scratch"), x)
    sites = acified.acnet_plan.converted
    assert len(sites) == 3 and all(s.bn and not s.bn_affine for s in sites)
    acified.eval()
    deployed = deploy(acified)
    assert all(deployed.get_submodule(s.name).bias.abs().max() > 1e-3 for s in sites)  # biases to carry
    save_weights(acified, tmp_path / "o.safetensors", "original")
    fresh = HardNetLike().double()
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "o.safetensors"), strict=True)
    with torch.no_grad():
        want = deployed(x)
        assert (want - fresh.eval()(x)).abs().max() <= 1e-8 * want.abs().max()  # relative, float64


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def steps_with_data(model, optimizer, steps):
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_load_resumes_training_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = acify(tiny_cnn(), init="scratch", gamma_init=1 / 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps_with_data(model, optimizer, 3)
    save_weights(model, tmp_path / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    steps_with_data(model, optimizer, 3)

    torch.manual_seed(1)  # another initialisation: everything must come from the files
    resumed = load(tiny_cnn(), tmp_path / "model.safetensors")
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed_optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    steps_with_data(resumed, resumed_optimizer, 3)
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


class Aliased(nn.Module):
    """One conv+BN stage reachable as stages.0 and as stem, called once."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))])
        self.stem = self.stages[0]
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.stem(x)))


def test_aliased_conv_and_bn_are_converted_at_every_name(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    acified = acify(Aliased(), init="scratch")
    site = acified.acnet_plan.converted[0]
    assert (site.name, site.aliases, site.bn, site.bn_aliases) == ("stages.0.0", ["stem.0"], "stages.0.1", ["stem.1"])
    assert isinstance(acified.stem[0], ACBlock) and acified.stem[0] is acified.stages[0][0]
    assert isinstance(acified.stem[1], nn.Identity) and acified.stem[1] is acified.stages[0][1]
    train_steps(acified, x)
    acified.eval()
    for inplace in (False, True):
        deployed = deploy(acified, inplace=False) if not inplace else deploy(load_copy(acified, tmp_path), inplace=True)
        assert type(deployed.stem[0]) is nn.Conv2d and deployed.stem[0] is deployed.stages[0][0]
        verify(acified, deployed, x, rtol=1e-5)
    state = original_state_dict(acified)
    assert set(state) == set(Aliased().state_dict())  # the keys of the unmodified model
    fresh = Aliased()
    fresh.load_state_dict(state, strict=True)
    verify(acified, fresh, x, rtol=1e-5)
    assert list(acified.state_dict()) == list(load(Aliased(), tmp_path / "copy.safetensors").state_dict())


def load_copy(model, tmp_path):
    save_weights(model, tmp_path / "copy.safetensors")
    return load(Aliased(), tmp_path / "copy.safetensors").eval()


def test_files_written_before_plans_were_recorded_still_load(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    acified = train_steps(acify(tiny_cnn()), x).eval()
    old = metadata("acified", spec="model.py", args=(), options={"mode": "exact"}, input_shape=(1, 3, 8, 8))
    write(tmp_path / "old.safetensors", acified.state_dict(), old)  # format, options and shape, no plan
    write(tmp_path / "bare.pt", acified.state_dict())  # what save_weights wrote then: a bare state_dict
    assert read(tmp_path / "old.safetensors").plan is None
    for name in ("old.safetensors", "bare.pt"):
        verify(acified, load(tiny_cnn(), tmp_path / name), x, rtol=0.0)  # the same weights: identical outputs


def test_load_names_the_mismatch_and_what_the_file_was_written_for(tmp_path):
    save_weights(acify(tiny_cnn()), tmp_path / "tiny.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(ACNetError, match=r"the recorded plan does not fit this model: 3 does not exist"):
        load(other, tmp_path / "tiny.safetensors")
    wider = tiny_cnn()
    wider[8] = nn.Linear(8, 5)
    with pytest.raises(ACNetError, match=r"2 of the wrong shape.*written for a torch.nn.modules.container.Sequential"):
        load(wider, tmp_path / "tiny.safetensors")
    with pytest.raises(ACNetError, match="load takes the unmodified model"):
        load(acify(tiny_cnn()), tmp_path / "tiny.safetensors")


def test_save_weights_refuses_unknown_formats_and_an_acified_form_of_a_plain_model(tmp_path):
    with pytest.raises(ACNetError, match="unknown format 'onnx': use one of acified, plain, original"):
        save_weights(acify(tiny_cnn()), tmp_path / "a.safetensors", "onnx")
    with pytest.raises(ACNetError, match="contains no block"):
        save_weights(tiny_cnn(), tmp_path / "a.safetensors", "acified")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_original_state_dict_needs_the_recorded_plan():
    with pytest.raises(ACNetError, match="carries no acnet_plan"):
        original_state_dict(tiny_cnn())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_every_library_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acify(tiny_cnn(), include=["nomatch*"])
        acify(Untraceable())
        deploy(tiny_cnn())
    assert [Path(w.filename).name for w in caught] == ["test_roundtrip.py"] * 3
    assert "pass example_inputs=" in str(caught[1].message) and "converted without their BatchNorm" in str(
        caught[1].message
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acify(Untraceable(), example_inputs=(torch.randn(1, 3, 8, 8),))
    assert not caught  # with example inputs there is nothing to warn about


def test_python_dash_m_demo_runs_the_demo(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "acnet_convert.demo", "--epochs", "1", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deployed" in done.stdout.lower() and (tmp_path / "acnet-demo.png").exists()
