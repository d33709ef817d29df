"""Deploy gives back the original conv class, subclasses included, for every built-in kind and mode."""

import pytest
import torch
from testkit import randomize_bn
from torch import nn

from acnet_convert import acify, deploy, load, original_state_dict, save_weights
from acnet_convert.constants import BUILTIN_VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")


class TaggedConv(nn.Conv2d):
    """A conv subclass with its own attribute and a constructor of its own."""

    def __init__(self, size: int, groups: int):
        super().__init__(6, 6, size, padding=size // 2, groups=groups, bias=False)
        self.tag = "tagged"


class PlainSubclass(nn.Conv2d):
    pass


def model(kind: str) -> nn.Sequential:
    """Two convs of subclasses that ``kind`` takes: depthwise 5x5 for the dilated kind, 3x3 for the others."""
    torch.manual_seed(0)
    size, groups = (5, 6) if kind == "dilated" else (3, 1)
    return nn.Sequential(
        TaggedConv(size, groups), nn.BatchNorm2d(6), nn.ReLU(),
        PlainSubclass(6, 6, size, padding=size // 2, groups=groups), nn.BatchNorm2d(6), nn.ReLU(),
    ).double()  # fmt: skip


@pytest.mark.parametrize("variant", BUILTIN_VARIANTS)
def test_deploy_keeps_the_conv_subclass_and_its_attributes(variant, tmp_path):
    kind, mode = variant.split("-")
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    acified = acify(model(kind), block=kind, mode=mode, init="scratch")
    assert [s.kind for s in acified.acnet_plan.converted] == [kind, kind]  # no fallback to another kind
    randomize_bn(acified, x)
    acified.eval()
    deployed = deploy(acified)
    assert [type(deployed[i]) for i in (0, 3)] == [TaggedConv, PlainSubclass]
    assert deployed[0].tag == "tagged" and deployed[0].weight.device.type == "cpu"
    with torch.no_grad():
        want = acified(x)
        assert (want - deployed(x)).abs().max() <= 1e-10 * want.abs().max()  # relative, float64
        original = model(kind).eval()
        original.load_state_dict(original_state_dict(acified), strict=True)
        assert (want - original(x)).abs().max() <= 1e-10 * want.abs().max()  # relative, float64
        save_weights(acified, tmp_path / "w.safetensors")
        resumed = load(model(kind), tmp_path / "w.safetensors").eval()
        redeployed = deploy(resumed)
        assert [type(redeployed[i]) for i in (0, 3)] == [TaggedConv, PlainSubclass]
        assert (want - resumed(x)).abs().max() <= 1e-12 * want.abs().max()  # relative, float64
