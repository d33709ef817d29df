"""The recipe "add a conv (or norm) adapter", followed to the letter: one registration call, nothing else.

A conv subclass that pads in ``forward`` (like timm's and efficientnet-pytorch's same-padding convs) is skipped
until its adapter is registered; then acify converts it, the plan records the adapter, and deploy gives back
a conv of that subclass that computes exactly what the block did.
"""

import pytest
import torch
import torch.nn.functional as F
from testkit import randomize_bn
from torch import nn

from acnet_convert import acify, deploy, plan, register_conv_adapter, register_norm_adapter, verify
from acnet_convert.analysis import adapters
from acnet_convert.modules import class_path


class StaticSamePadConv(nn.Conv2d):
    """Pads one more row and column at the end than at the start (what a stride-2 "same" conv needs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # fmt: skip


class BatchNormReLU(nn.BatchNorm2d):
    """Normalises, then applies its activation child ``act``."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = StaticSamePadConv(3, 8, 3, stride=2, bias=False), BatchNormReLU(8)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.fixture(autouse=True)
def _tables_kept():
    """The adapters this test registers are gone after it."""
    conv_before, norm_before = dict(adapters.CONV_ADAPTERS), dict(adapters.NORM_ADAPTERS)
    yield
    adapters.CONV_ADAPTERS.clear()
    adapters.CONV_ADAPTERS.update(conv_before)
    adapters.NORM_ADAPTERS.clear()
    adapters.NORM_ADAPTERS.update(norm_before)


def site(model, name):
    return next(s for s in plan(model).sites if s.name == name)


def test_a_conv_adapter_is_one_registration_call_and_deploy_is_exact():
    before = dict(adapters.CONV_ADAPTERS)
    assert site(Net(), "conv").codes == ["overrides-forward"], "without its adapter the conv is skipped"

    register_conv_adapter(StaticSamePadConv, pad=lambda conv: conv.static_padding)

    assert adapters.CONV_ADAPTERS.keys() - before.keys() == {class_path(StaticSamePadConv)}
    model = Net().double()
    recorded = site(model, "conv")
    assert (recorded.action, recorded.adapter, recorded.kind) == ("convert", class_path(StaticSamePadConv), "acb")
    assert recorded.bn is None and recorded.codes == ["bn-wrong-type"], "its BatchNorm subclass has no adapter yet"
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    acified = acify(model, init="scratch")
    randomize_bn(acified, x)
    deployed = deploy(acified.eval())
    assert type(deployed.conv) is StaticSamePadConv and deployed.conv.bias is not None
    assert verify(acified, deployed, x, rtol=1e-8).relative <= 1e-8
    assert acified.acnet_plan.sites[0].adapter == class_path(StaticSamePadConv)


def test_a_norm_adapter_is_one_registration_call_and_the_batchnorm_is_absorbed():
    register_conv_adapter(StaticSamePadConv, pad=lambda conv: conv.static_padding)
    before = dict(adapters.NORM_ADAPTERS)

    register_norm_adapter(BatchNormReLU, after=("act",))

    assert adapters.NORM_ADAPTERS.keys() - before.keys() == {class_path(BatchNormReLU)}
    model = Net().double()
    assert (site(model, "conv").bn, site(model, "conv").codes) == ("bn", [])
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    acified = acify(model, init="scratch")
    assert isinstance(acified.bn.act, nn.ReLU) and not isinstance(acified.bn, nn.BatchNorm2d)
    randomize_bn(acified, x)
    deployed = deploy(acified.eval())
    assert verify(acified, deployed, x, rtol=1e-8).relative <= 1e-8
    assert set(deployed.state_dict()) == {"conv.weight", "conv.bias", "head.weight", "head.bias"}
