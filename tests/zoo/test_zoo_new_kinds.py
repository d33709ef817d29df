"""The MobileOne and dilated kinds on representative models: mobile networks (1x1, depthwise 3x3 and 5x5, grouped
convs, squeeze-excitation convs without a BatchNorm) and ConvNeXt (7x7 depthwise convs, no BatchNorm).

Each model is built once (one input batch, 32x32) and shared by the checks of both kinds, each on its own copy.
"""

import copy
import itertools

import pytest
import timm
import torch
from roundtrip import check_kind
from torch import nn
from torchvision import models

from acnet_convert import plan

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
          "timm:convnext_atto")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(request) -> tuple[nn.Module, torch.Tensor]:
    """One model and its input batch; pytest groups the checks of one model, so one model is alive at a time."""
    name = request.param
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name.removeprefix("timm:"), pretrained=False)
    else:
        model = models.get_model(name, weights=None)
    return model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("kind", ["mobileone", "dilated"])
@pytest.mark.parametrize("classifier", MODELS, indirect=True)
def test_new_kind_converts_trains_and_deploys_exactly(classifier, kind):
    model, x = copy.deepcopy(classifier)
    check_kind(model, kind, x, deploy_rtol=1e-8)  # float64


@pytest.mark.parametrize("classifier", ["mobilenet_v2"], indirect=True)
def test_mobileone_takes_every_conv_of_mobilenet_v2_with_the_batchnorm_after_it(classifier):
    model, _ = classifier
    followed = {}  # conv -> the BatchNorm after it, read from the Sequential containers torchvision builds
    for parent_name, parent in model.named_modules():
        for (name, conv), (bn_name, bn) in itertools.pairwise(parent.named_children()):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                followed[f"{parent_name}.{name}".lstrip(".")] = f"{parent_name}.{bn_name}".lstrip(".")
    pointwise = [name for name in followed if model.get_submodule(name).kernel_size == (1, 1)]
    assert len(followed) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) and len(pointwise) > 30
    converted = {s.name: s.bn for s in plan(model, block="mobileone").converted if s.kind == "mobileone"}
    assert converted == followed
