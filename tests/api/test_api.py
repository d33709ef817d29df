"""acify / deploy / plan behaviour on hand-built models, one edge case per test."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from testkit import randomize_bn
from torch import nn

from acnet_convert import ACBlock, ACNetError, acify, deploy, plan, verify


def conv(cin=3, cout=8, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


def site(model_or_plan, name):
    sites = model_or_plan.sites if hasattr(model_or_plan, "sites") else model_or_plan.acnet_plan.sites
    return next(s for s in sites if s.name == name)


def assert_round_trip(model, x, rtol=1e-5):
    """acify (scratch init), give BNs real statistics, deploy, and compare eval outputs."""
    acified = acify(model, init="scratch")
    randomize_bn(acified, x)
    deployed = deploy(acified)
    assert not any(isinstance(m, ACBlock) for m in deployed.modules())
    verify(acified, deployed, x, rtol=rtol)
    return acified, deployed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = conv(), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = conv(8, 8), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)
        self.note = "kept"

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))

    def describe(self):
        return f"Net({self.note})"


X = torch.randn(4, 3, 10, 10)


def test_class_methods_attributes_and_hooks_survive_and_bns_are_absorbed():
    model = Net()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    acified = acify(model)
    assert type(acified) is Net and acified.describe() == "Net(kept)"
    assert isinstance(acified.conv1, ACBlock) and isinstance(acified.bn1, nn.Identity)
    assert site(acified, "conv1").bn == "bn1" and site(acified, "conv2").bn == "bn2"
    acified(X)
    assert calls == [1]
    assert isinstance(model.conv1, nn.Conv2d), "the original model must be untouched without inplace"


def test_preserve_init_keeps_the_original_function():
    model = Net()
    randomize_bn(model, X)
    model.eval()
    verify(model, acify(model), X, rtol=1e-5)


def test_acified_model_trains():
    acified = acify(Net(), init="scratch")
    opt = torch.optim.Adam(acified.parameters(), lr=0.01)
    y = torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(acified(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert acified.conv1.branches["hor"].conv.weight.grad is not None


def test_inplace_changes_the_given_model():
    model = Net()
    assert acify(model, inplace=True) is model and isinstance(model.conv1, ACBlock)
    assert deploy(model, inplace=True) is model and isinstance(model.conv1, nn.Conv2d)


def test_acify_is_idempotent():
    once = acify(Net())
    twice = acify(once)
    assert twice.acnet_plan.converted == []
    assert {s.action for s in twice.acnet_plan.sites} == {"done"}
    assert sum(isinstance(m, ACBlock) for m in twice.modules()) == 2


def test_deploy_of_a_plain_model_changes_nothing_and_warns_at_the_callers_line():
    model = Net()
    with pytest.warns(UserWarning, match="no ACNet blocks found: did you use the model acify returned") as caught:
        deployed = deploy(model)
    assert caught[0].filename == __file__
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), deployed.state_dict().values()))
    assert [type(m) for m in model.modules()] == [type(m) for m in deployed.modules()]


def test_deployed_model_keeps_the_plan_it_was_acified_with():
    acified = acify(Net())
    assert deploy(acified).acnet_plan.to_dict() == acified.acnet_plan.to_dict()


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(8, 8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_conv_called_twice_is_converted_without_its_bn():
    model = CalledTwice()
    s = site(plan(model), "conv")
    assert s.action == "convert" and s.bn is None and "called 2 times" in s.reason
    assert_round_trip(model, torch.randn(2, 8, 6, 6))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y.sigmoid()


def test_conv_output_used_by_bn_and_another_op_keeps_the_bn():
    model = SharedOutput()
    s = site(plan(model), "conv")
    assert s.bn is None and "feeds 2 operations" in s.reason
    acified, _ = assert_round_trip(model, X)
    assert isinstance(acified.bn, nn.BatchNorm2d)


class BnTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = conv(), conv(), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


def test_bn_called_twice_is_not_absorbed():
    p = plan(BnTwice())
    for name in ("conv1", "conv2"):
        assert site(p, name).bn is None and "more than once" in site(p, name).reason
    assert_round_trip(BnTwice(), X)


class WithBN(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv, self.bn = conv(), bn

    def forward(self, x):
        return self.bn(self.conv(x))


def test_bn_without_affine_is_absorbed_and_folded():
    model = WithBN(nn.BatchNorm2d(8, affine=False))
    assert site(plan(model), "conv").bn == "bn"
    assert_round_trip(model, X)


def test_bn_without_running_stats_stays_in_the_model():
    model = WithBN(nn.BatchNorm2d(8, track_running_stats=False))
    s = site(plan(model), "conv")
    assert s.action == "convert" and s.bn is None and "no running statistics" in s.reason
    acified = acify(model)
    assert isinstance(acified.bn, nn.BatchNorm2d)


def test_bn_with_cumulative_momentum_is_absorbed_and_its_momentum_copied():
    model = WithBN(nn.BatchNorm2d(8, momentum=None, eps=1e-3))
    acified, _ = assert_round_trip(model, X)
    assert acified.conv.branches["hor"].bn.momentum is None and acified.conv.branches["hor"].bn.eps == 1e-3


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv()
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False)


def test_conv_followed_by_functional_batch_norm_is_converted_alone():
    s = site(plan(FunctionalBN()), "conv")
    assert s.action == "convert" and s.bn is None and "batch_norm(), not a BatchNorm module" in s.reason
    assert_round_trip(FunctionalBN(), X)


class Looped(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(conv(8 if i else 3, 8) for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(3))

    def forward(self, x):
        for c, b in zip(self.convs, self.bns):
            x = torch.relu(b(c(x)))
        return x


def test_convs_in_a_module_list_loop_each_absorb_their_bn():
    p = plan(Looped())
    assert [site(p, f"convs.{i}").bn for i in range(3)] == [f"bns.{i}" for i in range(3)]
    assert_round_trip(Looped(), X)


class MisorderedRegistration(nn.Module):
    """Modules registered in an order unrelated to the data flow."""

    def __init__(self):
        super().__init__()
        self.bn_b, self.bn_a = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = conv(), conv(8, 8)

    def forward(self, x):
        return self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))


def test_pairing_follows_the_data_flow_not_the_registration_order():
    p = plan(MisorderedRegistration())
    assert site(p, "conv_a").bn == "bn_a" and site(p, "conv_b").bn == "bn_b"
    assert_round_trip(MisorderedRegistration(), X)


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclass(nn.Conv2d):
    pass


def test_conv_subclass_with_its_own_forward_is_skipped_and_reported():
    model = nn.Sequential(MyConv(3, 8, 3), nn.BatchNorm2d(8), PlainSubclass(8, 8, 3))
    p = plan(model)
    assert site(p, "0").action == "skip" and "overrides forward" in site(p, "0").reason
    assert site(p, "2").action == "convert"
    acified = acify(model)
    assert type(acified[0]) is MyConv and isinstance(acified[1], nn.BatchNorm2d)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.mean()


def test_conv_whose_weight_is_read_directly_is_skipped():
    s = site(plan(ReadsWeight()), "conv")
    assert s.action == "skip" and "conv.weight is read directly" in s.reason


def test_ineligible_kernels_are_skipped_with_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 2), nn.Conv2d(4, 4, (1, 3)), nn.Conv2d(4, 4, 7))
    p = plan(model, max_kernel=5)
    reasons = [s.reason for s in p.sites]
    assert "at least two kernel sides >= 3" in reasons[0] and "even" in reasons[1]
    assert "at least two kernel sides >= 3" in reasons[2] and "max_kernel=5" in reasons[3]
    assert p.converted == []


def test_weight_norm_parametrized_conv_is_skipped():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(conv()), nn.ReLU())
    assert "parametrized" in site(plan(model), "0").reason


def test_conv_with_hooks_is_skipped_and_bn_with_hooks_is_not_absorbed():
    model = WithBN(nn.BatchNorm2d(8))
    model.bn.register_forward_hook(lambda *_: None)
    assert site(plan(model), "conv").bn is None
    model.conv.register_forward_pre_hook(lambda *_: None)
    assert "hooks" in site(plan(model), "conv").reason


class CalledTwiceUnderTwoNames(CalledTwice):
    def __init__(self):
        super().__init__()
        self.alias = self.conv


def test_conv_registered_twice_and_called_twice_is_one_shared_block():
    model = CalledTwiceUnderTwoNames()
    s = site(plan(model), "conv")
    assert (s.action, s.bn, s.aliases) == ("convert", None, ["alias"])
    assert s.reason == "shared: called 2 times per forward, so it absorbs no BatchNorm"
    acified, deployed = assert_round_trip(model, torch.randn(2, 8, 6, 6))
    assert acified.alias is acified.conv and deployed.alias is deployed.conv


def test_include_and_exclude_patterns():
    p = plan(Net(), include=["conv*"], exclude=["*2"])
    assert site(p, "conv1").action == "convert"
    assert site(p, "conv2").action == "skip" and site(p, "conv2").reason == "matched by exclude"
    assert site(plan(Net(), include="conv2"), "conv1").reason == "not matched by include"


def test_pattern_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match=r"include pattern 'layer\*' matches no conv"):
        acify(Net(), include=["layer*"])


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ACNetError, match="expects a torch.nn.Module, got list"):
        acify([conv()])
    with pytest.raises(ACNetError, match="expects a torch.nn.Module, got str"):
        deploy("model.pt")
    with pytest.raises(ACNetError, match="unknown init"):
        acify(Net(), init="zeros")
    with pytest.raises(ACNetError, match="ACBlock.from_conv"):
        acify(conv())


class Untraceable(nn.Module):
    """Data-dependent control flow at the top, convs used directly in that forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv(), nn.BatchNorm2d(8), nn.ReLU())
        self.conv, self.bn = conv(8, 8), nn.BatchNorm2d(8)
        self.convs = nn.ModuleList([conv(8, 8), conv(8, 8)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 2
        y = self.conv(x)
        x = self.bn(y) * (y.shape[1] / 8)
        for c, b in zip(self.convs, self.bns):
            x = torch.relu(b(c(x)))
        return x


def test_untraceable_model_is_analysed_part_by_part():
    with pytest.warns(UserWarning, match="2 conv.s. there were left unconverted and 1 converted without their BatchNorm; pass example_inputs="):
        acified = acify(Untraceable())
    p = acified.acnet_plan
    assert "" in p.trace_failures
    assert site(p, "stem.0").bn == "stem.1", "the traceable child is analysed by fx"
    s = site(p, "conv")
    assert s.action == "convert" and s.bn is None and "only ever called" in s.reason
    for name in ("convs.0", "convs.1"):
        assert site(p, name).action == "skip" and "ModuleList used by code torch.fx cannot trace" in site(p, name).reason


def test_example_inputs_let_untraceable_convs_absorb_their_bns():
    model = Untraceable()
    p = plan(model, example_inputs=X)
    assert [site(p, n).bn for n in ("stem.0", "conv", "convs.0", "convs.1")] == ["stem.1", "bn", "bns.0", "bns.1"]
    acified = acify(model, example_inputs=(X,), init="scratch")
    randomize_bn(acified, X)
    verify(acified, deploy(acified), X, rtol=1e-5)
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) for n in ("conv", "convs.0"))


class UntraceableReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(8)
        self.other, self.other_bn = conv(), nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.bn(self.conv(x)) + self.other_bn(self.other(x))
        return y * self.conv.weight.abs().mean()


def test_untraceable_conv_whose_weight_is_read_is_left_alone_with_or_without_example_inputs():
    s = site(plan(UntraceableReadsWeight()), "conv")
    assert s.action == "skip" and "uses .conv other than by calling it" in s.reason
    p = plan(UntraceableReadsWeight(), example_inputs=(X,))
    assert site(p, "conv").action == "skip" and "used by abs outside its call" in site(p, "conv").reason
    assert site(p, "other").bn == "other_bn"


class UntraceableSharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.conv(x)
        return self.bn(y) + y


def test_example_run_sees_a_conv_output_used_twice():
    s = site(plan(UntraceableSharedOutput(), example_inputs=(X,)), "conv")
    assert s.action == "convert" and s.bn is None and "feeds 2 operations" in s.reason
    acified = acify(UntraceableSharedOutput(), example_inputs=(X,))
    assert isinstance(acified.bn, nn.BatchNorm2d)


def test_example_run_leaves_the_model_unchanged():
    model = Untraceable().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan(model, example_inputs=(X,))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_does_not_change_the_model_or_its_modes():
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan(model)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_prints_a_table_and_summary():
    text = str(plan(Net()))
    assert "conv1" in text and "+bn bn1" in text and "2 conv sites: 2 converted (2 with their BatchNorm)" in text


def test_training_only_branch_is_analysed_in_both_modes():
    class AuxInTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.aux, self.aux_bn = conv(), nn.BatchNorm2d(8), conv(8, 8), nn.BatchNorm2d(8)

        def forward(self, x):
            x = self.bn(self.conv(x))
            return x + self.aux_bn(self.aux(x)) if self.training else x

    model = AuxInTraining().eval()
    assert site(plan(model), "aux").bn == "aux_bn"
    assert not model.training


def test_verify_detects_a_different_model():
    a = Net().eval()
    b = Net().eval()
    with pytest.raises(ACNetError, match="outputs differ"):
        verify(a, b, X)


def test_verify_reports_per_layer_errors():
    acified = acify(Net(), init="scratch")
    randomize_bn(acified, X)
    result = verify(acified, deploy(acified), X, layers=True)
    assert set(result.layers) == {"conv1", "conv2"}
    assert max(c.relative for c in result.layers.values()) < 1e-5


def test_deploy_refuses_a_fusion_that_is_not_exact(monkeypatch):
    acified = acify(Net())
    monkeypatch.setattr(ACBlock, "fused_kernel", lambda self: (torch.zeros(8, self.in_channels, 3, 3, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)))
    with pytest.raises(ACNetError, match="not exact"):
        deploy(acified, inplace=True)
    assert isinstance(acified.conv1, ACBlock), "a failed deploy must leave the model unchanged"


def test_no_warning_on_a_clean_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acify(Net())


def test_verify_compares_fast_blocks_layer_by_layer_too():
    acified = acify(Net(), mode="fast", init="scratch")
    result = verify(acified, deploy(acified), X, layers=True)
    assert set(result.layers) == {"conv1", "conv2"}


def test_deploy_check_keeps_every_submodule_mode():
    acified = acify(Net()).train()
    acified.conv1.branches["hor"].bn.eval()
    deploy(acified)
    assert acified.conv1.training and not acified.conv1.branches["hor"].bn.training
    assert all(m.training for n, m in acified.named_modules() if n != "conv1.branches.hor.bn")


def test_plan_options_arrive_as_given():
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 3, padding=1))
    p = plan(model, layout3d="planes", include="0", min_kernel=3, max_kernel=3)
    assert (site(p, "0").layout, site(p, "0").bn) == ("planes", "1")
    assert site(p, "2").codes == ["not-included"]
