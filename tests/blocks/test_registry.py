"""Block kinds through one seam: a kind written outside the package, registered and used end to end."""

import pytest
import torch
from torch import nn

from acnet_convert import ACNetError, ReparamBlock, acify, deploy, load, plan, register_block, save_weights, verify
from acnet_convert.blocks.registry import block_class, is_block, kinds
from acnet_convert.constants import BUILTIN_KINDS
from acnet_convert.kernels import embed_centre


class PointwisePlus(ReparamBlock):
    """A KxK conv plus a 1x1 conv on the same input, summed: the smallest re-parameterisable block."""

    kind, mode, absorbs_bn = "pointwise_plus", "exact", False

    @classmethod
    def conv_problem(cls, conv, layout="lines"):
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            return "pointwise_plus wraps plain Conv2d without groups"
        k = conv.kernel_size
        if k[0] % 2 == 0 or k[1] % 2 == 0 or conv.padding != (k[0] // 2, k[1] // 2) or conv.dilation != (1, 1):
            return "pointwise_plus needs odd kernel sides and padding K//2"
        return ""

    @classmethod
    def describe(cls, conv, layout="lines"):
        return f"{conv.kernel_size[0]}x{conv.kernel_size[1]} + 1x1"

    @classmethod
    def from_conv(cls, conv, bn=None, *, init="preserve", gamma_init=1.0, layout="lines"):
        block = cls()
        block.conv = conv
        block.pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, bias=False,
                                    device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
        if init == "preserve":
            nn.init.zeros_(block.pointwise.weight)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(block, name, getattr(conv, name))
        block.train(conv.training)
        return block

    def forward(self, x):
        return self.conv(x) + self.pointwise(x)

    def equivalent_kernel(self, dtype=None):
        weight = self.conv.weight.to(dtype) + embed_centre(self.pointwise.weight.to(dtype), self.kernel_size)
        bias = self.conv.bias.to(dtype) if self.conv.bias is not None else weight.new_zeros(self.out_channels)
        return weight, bias

    def fused_kernel(self):
        with torch.no_grad():
            return self.equivalent_kernel(torch.float64)

    def fuse(self, weight=None, bias=None):
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         device=self.conv.weight.device, dtype=self.conv.weight.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv.train(self.training)


@pytest.fixture(autouse=True)
def pointwise_plus():
    """``pointwise_plus`` registered for each test of this file (conftest removes it after each)."""
    register_block("pointwise_plus", PointwisePlus)


def net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, dilation=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def test_a_kind_registered_from_outside_the_package_works_end_to_end(tmp_path):
    assert "pointwise_plus" in kinds() and block_class("pointwise_plus") is PointwisePlus
    report = plan(net(), block="pointwise_plus")
    assert [(s.kind, s.bn, s.bn_after) for s in report.converted] == [
        ("pointwise_plus", None, "1"), ("pointwise_plus", None, None), ("acb", None, None)
    ]  # fmt: skip
    assert report.converted[2].reason.startswith("pointwise_plus: pointwise_plus needs odd kernel sides and padding")
    x = torch.randn(4, 3, 8, 8)
    model = net().eval()
    acified = acify(model, block="pointwise_plus", init="scratch")
    assert sum(isinstance(m, PointwisePlus) for m in acified.modules()) == 2
    loss = acified(x).pow(2).mean()
    loss.backward()
    assert acified[3].pointwise.weight.grad.abs().max() > 0
    save_weights(acified, tmp_path / "p.safetensors")
    rebuilt = load(net(), tmp_path / "p.safetensors")
    assert isinstance(rebuilt[0], PointwisePlus)
    deployed = deploy(acified.double())
    assert not any(is_block(m) for m in deployed.modules())
    verify(acified, deployed, x.double(), rtol=1e-10)  # float64


def test_per_layer_choice_converts_exactly_the_matched_layers_and_records_it(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    acified = acify(model, block={"layer4.*": "dbb", "layer1.*": "repvgg"})
    kinds_by_name = {s.name: s.kind for s in acified.acnet_plan.converted}
    assert {n for n, k in kinds_by_name.items() if k == "dbb"} == {n for n in kinds_by_name if n.startswith("layer4.")}
    assert {n for n, k in kinds_by_name.items() if k == "repvgg"} == {
        n for n in kinds_by_name if n.startswith("layer1.")
    }
    assert {k for n, k in kinds_by_name.items() if not n.startswith(("layer1.", "layer4."))} == {"acb"}
    assert "dbb" in str(acified.acnet_plan) and "repvgg" in str(acified.acnet_plan)
    save_weights(acified, tmp_path / "mixed.safetensors")
    rebuilt = load(torchvision.models.resnet18(num_classes=10), tmp_path / "mixed.safetensors")
    assert {s.name: s.kind for s in rebuilt.acnet_plan.converted} == kinds_by_name
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in acified.modules()]


def test_bad_block_choices_name_the_registered_kinds():
    with pytest.raises(ACNetError, match="unknown block kind 'acnet': use one of acb, .*dbb"):
        acify(net(), block="acnet")
    with pytest.raises(ACNetError, match="block kind 'qarepvgg' has no fast mode: use mode='exact'"):
        acify(net(), block="qarepvgg", mode="fast")
    with pytest.raises(ACNetError, match="block must be a kind or a mapping"):
        acify(net(), block=["dbb"])
    with pytest.raises(ACNetError, match="needs a subclass of acnet_convert.ReparamBlock"):
        register_block("plain", nn.Conv2d)


def test_report_sites_name_their_kind_and_skipped_sites_have_none():
    report = plan(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), block="repvgg", mode="fast")
    assert [(s.kind, s.mode) for s in report.sites] == [("repvgg", "fast"), (None, None)]


def test_register_block_reads_the_kind_from_the_class_and_checks_one_given_with_it():
    class OtherPlus(PointwisePlus):
        kind = "other_plus"

    class UnnamedPlus(PointwisePlus):  # inherits the kind "pointwise_plus"
        pass

    register_block(OtherPlus)
    assert block_class("other_plus") is OtherPlus and kinds()[:len(BUILTIN_KINDS)] == tuple(BUILTIN_KINDS)
    with pytest.raises(ACNetError, match="got kind 'elsewise' for OtherPlus, whose kind is 'other_plus'"):
        register_block("elsewise", OtherPlus)
    register_block("unnamed_plus", UnnamedPlus)  # the 0.2 form names the kind of a class that only inherits one
    assert UnnamedPlus.kind == "unnamed_plus" and PointwisePlus.kind == "pointwise_plus"
    assert block_class("unnamed_plus") is UnnamedPlus and block_class("pointwise_plus") is PointwisePlus
