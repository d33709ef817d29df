"""The paper's full block on timm families: BatchNormAct2d absorbed, TF-"same" convs converted, shared convs."""

import pytest
import torch
from roundtrip import calibrate_bn, eligible_convs, output_sum
from torch import nn

from acnet_convert import acify, deploy, original_state_dict, plan, verify
from acnet_convert.blocks.padded import PaddedBlock
from acnet_convert.blocks.registry import is_block

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


def followed_by_bnact(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Convs whose output goes straight into a BatchNormAct2d and nowhere else, found by running the model with hooks
    (independently of the library's analysis)."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    fed: dict[str, list[str]] = {}

    def conv_hook(module, args, out):
        produced[id(out)] = names[module]

    def bn_hook(module, args):
        source = produced.get(id(args[0]))
        if source is not None:
            fed.setdefault(source, []).append(type(module).__name__)

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return {conv for conv, users in fed.items() if users == ["BatchNormAct2d"]}


def check_family(name: str, size: int = 32) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    takes = {id(m) for m in eligible_convs(model)}  # odd sides, at least two of them >= 3: what ACB applies to
    expected = {n for n in followed_by_bnact(model, x) if id(model.get_submodule(n)) in takes}
    acified = acify(model, init="preserve")
    verify(model, acified, x, rtol=1e-5)  # preserve init: relative to max(1, max|original|)
    absorbed = {s.name for s in acified.acnet_plan.converted if s.bn}
    assert expected and expected <= absorbed
    assert all(type(model.get_submodule(s.bn)).__name__ in ("BatchNormAct2d", "BatchNorm2d")
               for s in acified.acnet_plan.converted if s.bn)  # fmt: skip

    acified.train()
    output_sum(acified(x)).backward()
    calibrate_bn(acified, (x,))
    acified.double()
    deployed = deploy(acified)
    verify(acified, deployed, x.double(), rtol=1e-8)  # float64: the conversion alone
    for site in acified.acnet_plan.converted:
        assert type(deployed.get_submodule(site.name)) is type(model.get_submodule(site.name))
    fresh = timm.create_model(name, pretrained=False).double()
    fresh.load_state_dict(original_state_dict(acified), strict=True)
    verify(acified, fresh, x.double(), rtol=1e-8)


@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "mobilenetv3_small_050", "regnety_002", "cs3darknet_s", "inception_v3"]
)
def test_batchnormact_is_absorbed_and_deployment_is_exact(name):
    check_family(name, 75 if name == "inception_v3" else 32)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_mobilenetv3_small_075"])
def test_tf_same_convs_are_converted_and_exact_where_the_padding_is_asymmetric(name):
    model = timm.create_model(name, pretrained=False).eval()
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    acified = acify(model, init="scratch")
    converted = {s.name for s in acified.acnet_plan.converted}
    assert same and set(same) <= converted
    assert all(isinstance(acified.get_submodule(n), PaddedBlock) for n in same)
    x = torch.randn(2, 3, 33, 33)  # odd size, stride 2: TF "same" pads one more row and column at the end
    acified.train()
    output_sum(acified(x)).backward()
    calibrate_bn(acified, (x,))
    acified.double()
    deployed = deploy(acified)
    assert all(type(deployed.get_submodule(n)).__name__ == "Conv2dSame" for n in same)
    verify(acified, deployed, x.double(), rtol=1e-8)


def test_smp_static_same_padding_convs_are_converted():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.FPN(encoder_name="efficientnet-b0", encoder_weights=None).eval()
    static = [n for n, m in model.named_modules()
              if type(m).__name__ == "Conv2dStaticSamePadding" and max(m.kernel_size) > 1]  # fmt: skip
    acified = acify(model, init="scratch")
    assert static and set(static) <= {s.name for s in acified.acnet_plan.converted}
    x = torch.randn(2, 3, 64, 64)
    calibrate_bn(acified, (x,))
    acified.double()
    deployed = deploy(acified)
    assert all(type(deployed.get_submodule(n)).__name__ == "Conv2dStaticSamePadding" for n in static)
    verify(acified, deployed, x.double(), rtol=1e-8)


def test_coat_shared_convs_become_shared_blocks():
    model = timm.create_model("coat_tiny", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    eligible = {id(m) for m in eligible_convs(model)}
    acified = acify(model, init="scratch", example_inputs=(x,))
    shared = [s for s in acified.acnet_plan.converted if s.reason.startswith("shared")]
    assert shared and all(s.bn is None for s in shared)
    assert sum(1 for m in {id(m): m for m in acified.modules() if is_block(m)}.values()) == len(eligible)
    with torch.no_grad():
        for p in acified.parameters():
            p.add_(0.01 * torch.randn_like(p))  # stands in for training: the new branches move away from zero
    acified.double()
    verify(acified, deploy(acified), x.double(), rtol=1e-8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class Collision(nn.Module):
    """Untraceable code that reads ``self.block.proj.weight`` (a Linear); the conv ``proj`` is only ever called."""

    def __init__(self):
        super().__init__()
        self.proj, self.block = nn.Conv2d(3, 8, 3, padding=1), Block()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this module, so its source decides
            x = -x
        return self.block(self.proj(x).mean((2, 3))) * self.block.proj.weight.mean()


class ReadsOwn(nn.Module):
    """The same, but the untraceable code reads the conv's own weight."""

    def __init__(self):
        super().__init__()
        self.proj, self.block = nn.Conv2d(3, 8, 3, padding=1), Block()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(self.proj(x).mean((2, 3))) * self.proj.weight.mean()


def test_an_attribute_of_the_same_name_elsewhere_no_longer_blocks_a_conv():
    site = plan(Collision()).sites[0]
    assert (site.name, site.action, site.evidence) == ("proj", "convert", "source")
    site = plan(ReadsOwn()).sites[0]
    assert site.action == "skip" and "uses .proj other than by calling it" in site.reason
