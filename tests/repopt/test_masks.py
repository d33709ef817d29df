"""The gradient preconditioner of mode="repopt" on a model: plain keys, survives copies, pickles, dtype moves, files
and DDP; deploy leaves no trace; init="scratch"; a warning for optimizers that do not keep the equivalence."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from csla import BRANCHES, Net, batches

from acnet_convert import ACNetError, acify, deploy, load, plan, save_weights
from acnet_convert.api import apply_plan
from acnet_convert.repopt import has_masks, is_masked

KINDS = ("acb", "repvgg", "dbb")


def one_step(model, x, y, lr=0.5):
    """The change of c2's kernel after one SGD step (no momentum, no decay)."""
    before = model.c2.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model.c2.weight.detach() - before


def expected_step(model, x, y):
    """The step a model without a preconditioner takes, through c2's mask (the kinds in these tests have no pool)."""
    plain = deploy(model)
    return one_step(plain, x, y) * model.c2.repopt_mask


@pytest.fixture
def data():
    return batches(1)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_keeps_its_classes_and_state_dict_keys(kind):
    model = Net().double()
    acified = acify(model, block=kind, mode="repopt")
    assert [type(m) for m in acified.modules()] == [type(m) for m in model.modules()]
    assert list(acified.state_dict()) == list(model.state_dict())
    Net().double().load_state_dict(acified.state_dict(), strict=True)
    assert all(is_masked(getattr(acified, n)) for n in ("c1", "c2", "c3", "c4"))
    assert all(s.mode == "repopt" and s.scales for s in acified.acnet_plan.converted)
    assert not has_masks(model)  # acify copied the model


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)),
                                    lambda m: copy.deepcopy(m).float().double()], ids=["deepcopy", "pickle", "dtype"])
def test_the_preconditioner_survives_copies(copier, data):
    x, y = data
    model = acify(Net().double(), block="acb", mode="repopt")
    model(x)  # the original's weights are hooked before it is copied
    copied = copier(model)
    assert copied.c2.repopt_mask.dtype == torch.float64
    want = expected_step(copied, x, y)
    got = one_step(copied, x, y)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-12
    assert (got - want / copied.c2.repopt_mask).abs().max() > 1e-3  # the mask acts


def test_a_replaced_weight_is_hooked_too(data):
    x, y = data
    model = acify(Net().double(), block="acb", mode="repopt")
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # new Parameter objects
    want = expected_step(model, x, y)
    assert ((one_step(model, x, y) - want).abs().max() / want.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_deploy_leaves_no_trace(kind, data):
    x, _ = data
    model = acify(Net().double(), block=kind, mode="repopt")
    model(x)
    for deployed in (deploy(model), deploy(copy.deepcopy(model), inplace=True)):
        assert not has_masks(deployed)
        assert all(not m._forward_pre_hooks and not m._non_persistent_buffers_set for m in deployed.modules())
        assert b"repopt_" not in pickle.dumps(deployed) and b"WeightHook" not in pickle.dumps(deployed)
        assert all(not p._backward_hooks for p in deployed.parameters())
        assert torch.equal(deployed(x), model(x))
    assert has_masks(model)  # deploy copies unless inplace


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_resume_keep_the_preconditioner(kind, tmp_path, data):
    x, y = data
    recorded = plan(Net(), block=kind, mode="repopt")
    for site in recorded.converted:  # per-channel scales, as a search gives
        site.scales = {name: torch.linspace(-1.5, 1.5, 8).tolist() for name in BRANCHES[kind] if name != "pointwise"
                       or site.name != "c3" or kind != "dbb"}  # fmt: skip
    model = apply_plan(Net().double(), recorded)
    path = save_weights(model, tmp_path / "repopt.safetensors")
    resumed = load(Net().double(), path)
    assert has_masks(resumed) and resumed.acnet_plan.to_dict() == model.acnet_plan.to_dict()
    for name in ("c1", "c2", "c3", "c4"):
        assert torch.equal(getattr(resumed, name).repopt_mask, getattr(model, name).repopt_mask)
    assert torch.equal(one_step(resumed, x, y), one_step(model, x, y))
    for fmt in ("plain", "original"):
        shipped = load(Net().double(), save_weights(model, tmp_path / f"{fmt}.safetensors", format=fmt))
        assert not has_masks(shipped)
        assert torch.equal(shipped(x), model(x))


def test_recorded_scales_are_the_masks(tmp_path):
    model = Net().double()
    recorded = plan(model, block="repvgg", mode="repopt")
    for site in recorded.converted:
        site.scales = {"square": [2.0], "pointwise": torch.arange(8.0).tolist()}
    apply_plan(model, recorded)
    mask = model.c4.repopt_mask  # 8 -> 8, stride 1: with the identity tap
    assert mask[3, 0, 0, 0] == 4.0 and mask[3, 5, 1, 1] == 4.0 + 9.0 and mask[3, 3, 1, 1] == 4.0 + 9.0 + 1.0
    loaded = load(Net().double(), save_weights(model, tmp_path / "w.safetensors"))
    assert torch.equal(loaded.c4.repopt_mask, mask)


def test_init_scratch_starts_from_the_csla_sum_and_preserve_keeps_the_kernel():
    torch.manual_seed(0)
    model = Net().double()
    kept = acify(model, block="repvgg", mode="repopt")
    assert all(torch.equal(getattr(kept, n).weight, getattr(model, n).weight) for n in ("c1", "c2", "c3", "c4"))
    torch.manual_seed(1)
    scratch = acify(model, block="repvgg", mode="repopt", init="scratch")
    added = scratch.c4.weight - model.c4.weight
    assert added[:, :, 0, 0].abs().max() == 0  # the 1x1 branch and the identity sit at the centre only
    centre = added[:, :, 1, 1]
    bound = 1 / 8**0.5  # PyTorch's default initialisation of the 1x1 branch: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert (centre - torch.eye(8, dtype=torch.float64)).abs().max() <= bound and centre.diagonal().mean() > 0.5


def test_a_plan_is_not_applied_twice():
    model = acify(Net(), block="acb", mode="repopt")
    with pytest.raises(ACNetError, match="c1 already has a repopt gradient preconditioner"):
        apply_plan(model, model.acnet_plan)
    again = plan(model, block="acb", mode="repopt").sites  # acify converts none
    assert [s.code for s in again] == ["hooks"] * 4
    assert all("already has a repopt gradient preconditioner" in s.reason for s in again)


def test_unsupported_kinds_and_convs_are_named():
    with pytest.raises(ACNetError, match="qarepvgg.*no repopt mode"):
        acify(Net(), block="qarepvgg", mode="repopt")
    with pytest.raises(ACNetError, match="unknown block kind 'nope'"):
        acify(Net(), block="nope", mode="repopt")
    one_by_five = torch.nn.Sequential(torch.nn.Conv2d(3, 4, (1, 5), padding=(0, 2)), torch.nn.Conv2d(4, 4, 4))
    recorded = acify(one_by_five, block="acb", mode="repopt").acnet_plan
    assert [s.action for s in recorded.sites] == ["skip", "skip"]


@pytest.mark.parametrize(("kind", "optimizer", "options", "says"), [
    ("acb", torch.optim.RMSprop, {}, "barely acts"),
    ("acb", torch.optim.Adam, {"weight_decay": 1e-4}, "use AdamW"),
    ("dbb", torch.optim.AdamW, {}, "average-pool branch"),
])  # fmt: skip
def test_optimizers_that_break_the_equivalence_are_warned_about_once(kind, optimizer, options, says, data):
    x, y = data
    model = acify(Net().double(), block=kind, mode="repopt")
    opt = optimizer(model.parameters(), lr=1e-3, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()  # the warning points here
    messages = [w for w in caught if "repopt" in str(w.message)]
    assert len(messages) == 1 and optimizer.__name__ in str(messages[0].message) and says in str(messages[0].message)
    assert messages[0].filename == __file__


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_sgd_and_adamw_are_not_warned_about(optimizer, data):
    x, y = data
    model = acify(Net().double(), block="acb", mode="repopt")
    opt = optimizer(model.parameters(), lr=1e-3, weight_decay=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_ddp_reduces_the_preconditioned_gradient(tmp_path, data):
    x, y = data
    model = acify(Net().double(), block="dbb", mode="repopt")
    want = one_step(copy.deepcopy(model), x, y)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        before = model.c2.weight.detach().clone()
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    finally:
        dist.destroy_process_group()
    got = model.c2.weight.detach() - before
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-12


def test_amp_scaling_passes_through_the_preconditioner(data):
    """Autocast and a GradScaler: the scaled gradient is preconditioned, then unscaled, as if done by hand."""
    x, y = data
    model = acify(Net(), block="acb", mode="repopt")
    by_hand = deploy(model)
    masks = {name: getattr(model, name).repopt_mask for name in ("c1", "c2", "c3", "c4")}
    start = {name: getattr(model, name).weight.detach().clone() for name in masks}
    for net in (model, by_hand):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x.float()), y)
        scaler.scale(loss).backward()
        if net is by_hand:
            for name, mask in masks.items():
                getattr(net, name).weight.grad.mul_(mask)
        scaler.step(optimizer)
        scaler.update()
    for name in masks:
        got, want = getattr(model, name).weight, getattr(by_hand, name).weight
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name
        assert (got - start[name]).abs().max() > 1e-4, name  # the step was taken (the scaler found no inf)


class TiedConvs(torch.nn.Module):
    """Two convs that share one weight tensor (tied weights)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("copier", [lambda m: m, copy.deepcopy], ids=["as-built", "deepcopy"])
def test_a_weight_two_convs_share_is_preconditioned_once(copier):
    model = TiedConvs().double()
    acified = copier(acify(model, block="acb", mode="repopt"))
    assert acified.a.weight is acified.b.weight and len(acified.acnet_plan.converted) == 2
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for m in (model, acified):
        m(x).square().sum().backward()
    want = model.a.weight.grad * acified.a.repopt_mask
    assert ((acified.a.weight.grad - want).abs().max() / want.abs().max()).item() <= 1e-12
