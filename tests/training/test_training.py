"""Training integration: weight inheritance, the one-line hooks, checkpoints, a real data set, AMP and dtypes."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from testkit import randomize_bn
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from acnet_convert import ACBlock, ACNetError, FastACBlock, acify, deploy, verify
from acnet_convert.demo.experiment import load_digits
from acnet_convert.demo.models import SmallCNN
from acnet_convert.training import ACNetTraining, acnet_model, save_weights


def tiny_cnn(**kwargs) -> nn.Module:
    """The paper's small CNN at a width that trains in milliseconds."""
    return SmallCNN(in_channels=3, num_classes=4, width=8, **kwargs)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch: int = 8) -> list[float]:
    """Train on random batches drawn from the global RNG; return the losses."""
    losses = []
    for _ in range(steps):
        x, y = torch.randn(batch, 3, 12, 12), torch.randint(0, 4, (batch,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def blocks(model: nn.Module) -> list[ACBlock]:
    return [m for m in model.modules() if isinstance(m, ACBlock)]


def test_square_branch_inherits_the_trained_conv_and_bn():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, eps=1e-3, momentum=0.05))
    randomize_bn(model, torch.randn(4, 3, 8, 8))
    acified = acify(model)
    square = acified[0].branches["square"]
    for name, tensor in model[0].state_dict().items():
        assert torch.equal(square.conv.state_dict()[name], tensor), name
    for name, tensor in model[1].state_dict().items():
        assert torch.equal(square.bn.state_dict()[name], tensor), name
    assert (square.bn.eps, square.bn.momentum) == (1e-3, 0.05)
    assert square.conv.weight is not model[0].weight, "acify copies unless inplace=True"
    for name in ("hor", "ver"):
        new_bn = acified[0].branches[name].bn
        assert torch.all(new_bn.weight == 0) and torch.all(new_bn.bias == 0)


def test_scratch_init_sets_gamma_init_and_default_initialises_the_new_kernels():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6))
    randomize_bn(model, torch.randn(4, 3, 8, 8))
    block = acify(model, init="scratch", gamma_init=1 / 3)[0]
    square = block.branches["square"]
    assert torch.equal(square.conv.weight, model[0].weight) and torch.equal(square.conv.bias, model[0].bias)
    for name in ("bias", "running_mean", "running_var"):
        assert torch.equal(getattr(square.bn, name), getattr(model[1], name)), name
    assert torch.all(square.bn.weight == torch.tensor(1 / 3)), "scratch: every branch's gamma starts at gamma_init"
    for name in ("hor", "ver"):
        branch = block.branches[name]
        assert torch.all(branch.bn.weight == torch.tensor(1 / 3)) and torch.all(branch.bn.bias == 0)
        # PyTorch's default conv initialisation: kaiming_uniform(a=sqrt(5)), i.e. U(-b, b) with b = 1/sqrt(fan_in)
        bound = 1 / math.sqrt(branch.conv.weight[0].numel())
        assert branch.conv.weight.abs().max() <= bound and branch.conv.weight.std() > bound / 3


def test_acnet_model_decorates_a_factory_bare_or_with_options():
    @acnet_model
    def build(width: int) -> nn.Module:
        """Build the network."""
        return SmallCNN(3, 4, width)

    @acnet_model(init="scratch", gamma_init=0.25)
    def build_scratch() -> nn.Module:
        return tiny_cnn()

    model = build(8)
    assert build.__name__ == "build" and build.__doc__ == "Build the network."
    assert len(blocks(model)) == 3 and len(model.acnet_plan.converted) == 3
    assert all(torch.all(b.branches["hor"].bn.weight == 0) for b in blocks(model))
    assert all(torch.all(b.branches["ver"].bn.weight == 0.25) for b in blocks(build_scratch()))


def test_acnet_model_refuses_an_unknown_option_when_decorating():
    with pytest.raises(ACNetError, match="unknown acify option 'inint'"):
        acnet_model(inint="scratch")
    with pytest.raises(ACNetError, match="unknown acify option 'inplace'"):
        acnet_model(inplace=False)


def test_acnet_training_trains_then_writes_the_deployed_weights(tmp_path):
    out = tmp_path / "deployed.safetensors"
    with ACNetTraining(tiny_cnn(), out=out) as run:
        optimizer = torch.optim.SGD(run.model.parameters(), lr=0.05, momentum=0.9)
        losses = train_steps(run.model, optimizer, steps=5)
        assert not out.exists(), "nothing is written before training ends"
    assert all(math.isfinite(loss) for loss in losses) and len(blocks(run.model)) == 3
    assert not blocks(run.deployed) and not run.deployed.training
    x = torch.randn(6, 3, 12, 12)
    result = verify(run.model, run.deployed, x, rtol=1e-5)  # float32 forward of a float64-exact fusion
    assert result.relative <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["deployed.safetensors"], "no temporary file is left behind"

    skeleton = deploy(acify(tiny_cnn()), check=False).eval()
    skeleton.load_state_dict(load_file(out))
    with torch.no_grad():
        assert torch.equal(skeleton(x), run.deployed(x))


def test_acnet_training_writes_nothing_when_training_raises(tmp_path):
    out = tmp_path / "deployed.pt"
    with pytest.raises(RuntimeError, match="diverged"):
        with ACNetTraining(tiny_cnn(), out=out) as run:
            raise RuntimeError("diverged")
    assert run.deployed is None and not out.exists()


def test_save_weights_handles_tied_tensors_and_the_torch_format(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied: safetensors refuses aliased tensors unless copied
    save_weights(model, tmp_path / "tied.safetensors")
    save_weights(model, tmp_path / "sub" / "tied.pt")
    for path, load in [
        (tmp_path / "tied.safetensors", lambda m, p: m.load_state_dict(load_file(p))),
        (tmp_path / "sub" / "tied.pt", lambda m, p: m.load_state_dict(torch.load(p, weights_only=True)["state_dict"])),
    ]:
        fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fresh[1].weight = fresh[0].weight
        load(fresh, path)
        for want, got in zip(model.state_dict().values(), fresh.state_dict().values()):
            assert torch.equal(want, got)


def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path):
    def fresh(seed):
        torch.manual_seed(seed)  # a different seed: the new branches start elsewhere, the checkpoint must restore them
        model = acify(tiny_cnn(), init="scratch", gamma_init=1 / 3)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = fresh(0)
    train_steps(model, optimizer, steps=3)
    save_weights(model, tmp_path / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    train_steps(model, optimizer, steps=3)

    resumed, resumed_optimizer = fresh(1)
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed_optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    train_steps(resumed, resumed_optimizer, steps=3)

    want, got = model.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name  # bit-identical, parameters and BN statistics alike


@pytest.mark.parametrize("init", ["preserve", "scratch"])
def test_small_cnn_learns_digits_and_the_deployed_model_predicts_the_same(init):
    data = load_digits()
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
    model = acify(SmallCNN(in_channels=1, num_classes=10, width=16), init=init, gamma_init=1 / 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, len(y_train), (64,), generator=batches)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    deployed = deploy(model).eval()
    model.eval()
    with torch.no_grad():
        acified_logits, deployed_logits = model(x_test), deployed(x_test)
    accuracy = (acified_logits.argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.8, accuracy  # chance is 0.1; these 60 steps reach about 0.96-0.97
    assert torch.equal(deployed_logits.argmax(1), acified_logits.argmax(1))
    assert verify(model, deployed, x_test, rtol=1e-5).relative <= 1e-5


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bfloat16_autocast_training_and_deploy_from_full_precision_weights(mode):
    model = acify(tiny_cnn(), init="scratch", mode=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.dtype == torch.bfloat16, "autocast was active"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0], losses

    with torch.autocast("cpu", dtype=torch.bfloat16):
        deployed = deploy(model)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (ACBlock, FastACBlock))]
    assert blocks
    for name, block in blocks:
        weight, bias = block.fused_kernel()  # float64, from the float32 master weights
        conv = deployed.get_submodule(name)
        assert conv.weight.dtype == torch.float32 and conv.weight.device == x.device
        assert torch.equal(conv.weight, weight.float())
        assert conv.bias is None or torch.equal(conv.bias, bias.float())
    assert verify(model, deployed, x, rtol=1e-5).relative <= 1e-5  # float32 forward rounding only


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.bfloat16, 3e-2)])
def test_float64_and_bfloat16_models_train_and_deploy(dtype, rtol):
    model = acify(tiny_cnn(), init="scratch").to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 12, 12, dtype=dtype), torch.randint(0, 4, (16,))
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    deployed = deploy(model)
    assert all(p.dtype == dtype for p in deployed.parameters())
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, ACBlock)]:
        assert torch.equal(deployed.get_submodule(name).weight, block.fused_kernel()[0].to(dtype))
    # Judged against the acified model run in float64, so that the bound measures the deployed model's own
    # rounding (bfloat16 keeps 8 significant bits, about 4e-3 relative per weight).
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        want, got = reference(x.double()), deployed.eval()(x).double()
    assert (want - got).abs().max() <= rtol * max(1.0, want.abs().max().item())


def test_channels_last_model_trains_like_the_contiguous_one_and_deploys():
    contiguous = acify(tiny_cnn(), init="scratch")
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert channels_last.features[0][0].branches["square"].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
    for model, inputs in [(contiguous, x), (channels_last, x.to(memory_format=torch.channels_last))]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            loss = F.cross_entropy(model(inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(contiguous.parameters(), channels_last.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32 kernels differ by layout, not by much

    deployed = deploy(channels_last).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    assert deployed.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert verify(channels_last, deployed, x_cl, rtol=1e-5).relative <= 1e-5


@pytest.mark.parametrize("when", ["after acify", "before acify"])
def test_sync_batchnorm_branches_train_and_fold(when):
    """Without a process group SyncBatchNorm normalises locally, so this runs on CPU; see test_training_ddp.py."""
    model = tiny_cnn()
    if when == "before acify":
        model = acify(nn.SyncBatchNorm.convert_sync_batchnorm(model), init="scratch")
        assert all(site.bn for site in model.acnet_plan.converted)
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(acify(model, init="scratch"))
    branch_bns = [branch.bn for block in blocks(model) for branch in block.branches.values()]
    assert len(branch_bns) == 9 and all(type(bn) is nn.SyncBatchNorm for bn in branch_bns)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=3)
    deployed = deploy(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert verify(model, deployed, torch.randn(4, 3, 12, 12), rtol=1e-5).relative <= 1e-5


def test_importing_the_package_does_not_import_lightning_until_the_callback_is_used():
    code = (
        "import sys, acnet_convert; from acnet_convert import *; assert 'lightning' not in sys.modules; "
        "from acnet_convert import ACNetCallback; assert 'lightning' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
