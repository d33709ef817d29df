"""Every torchvision classification, segmentation and detection model: convert, train a step, deploy exactly.

Classification and segmentation models are built once each (with one input batch) and shared by every check of
them: ACB with init="preserve" and with a scratch round trip, DBB and RepVGG (on every model but the largest of a
family), and QARepVGG (whose branches are RepVGG's with the BatchNorms moved) on one model of each architecture. Each
check works on its own copy of the model.
"""

import copy

import pytest
import torch
from roundtrip import LARGEST, check_kind, check_round_trip, give_bn_statistics, output_sum
from torch import nn
from torchvision import models

from acnet_convert import ACBlock, acify

# Small inputs keep the suite fast; these models need a particular size (the rest run at 32x32).
INPUT_SIZE = {"alexnet": 64, "googlenet": 64, "inception_v3": 299, "maxvit_t": 224, "vit_h_14": 28}
VIT = {name for name in models.list_models(module=models) if name.startswith("vit_")}

# 48x48 is 6x6 at the backbones' stride 8, where the dilated 3x3 convs (dilation 2 and 4) still reach real pixels
# with every tap; ASPP's larger dilations reach only padding there at any small size.
SEGMENTATION_SIDE = 48
CLASSIFICATION = models.list_models(module=models)
CLASSIFICATION_FOR_KINDS = [name for name in CLASSIFICATION if name not in LARGEST]
SEGMENTATION = models.list_models(module=models.segmentation)
# deeplabv3_resnet50 has every kind checked on the same head and backbone design; its ResNet-101 twin, the slowest
# segmentation model, only ACB.
SEGMENTATION_FOR_KINDS = [name for name in SEGMENTATION if name != "deeplabv3_resnet101"]
DETECTION = models.list_models(module=models.detection)
KINDS = ("dbb", "repvgg")
# One model per architecture family for QARepVGG (and every segmentation model): plain, strided, grouped (ResNeXt,
# RegNet), depthwise (MobileNet, EfficientNet, ConvNeXt 7x7) and rectangular (Inception) convs occur among them,
# dilated ones in the segmentation backbones.
QAREPVGG = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
            "vgg11_bn", "wide_resnet50_2")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(request) -> tuple[nn.Module, torch.Tensor]:
    """One classifier and its input batch; pytest groups the checks of one model, so one model is alive at a time."""
    name = request.param
    torch.manual_seed(0)
    size = INPUT_SIZE.get(name, 32)
    model = models.get_model(name, weights=None, **({"image_size": size} if name in VIT else {}))
    return model, torch.randn(2, 3, size, size)


@pytest.fixture(scope="module")
def segmenter(request) -> tuple[nn.Module, torch.Tensor]:
    """One segmentation model and its input batch, shared like ``classifier``."""
    name = request.param
    torch.manual_seed(0)
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    model = models.get_model(name, weights=None, weights_backbone=None, **aux)
    return model, torch.randn(2, 3, SEGMENTATION_SIDE, SEGMENTATION_SIDE)


@pytest.mark.parametrize("classifier", CLASSIFICATION, indirect=True)
def test_preserve_init_keeps_the_eval_output_of_every_classifier(classifier):
    model, x = copy.deepcopy(classifier)
    model.eval()
    give_bn_statistics(model)
    with torch.no_grad():
        want = model(x)
    acified = acify(model, inplace=True)  # in place: no second copy of the largest models; `want` was taken before
    with torch.no_grad():
        got = acified(x)
    converted = acified.acnet_plan.converted
    assert sum(isinstance(m, ACBlock) for m in acified.modules()) == len(converted)
    assert torch.isfinite(want).all()
    # Bound relative to max(1, max|want|); the new branches contribute exact zeros, so it holds in float32.
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("classifier", CLASSIFICATION, indirect=True)
def test_classification_model(classifier):
    model, x = copy.deepcopy(classifier)
    check_round_trip(model, lambda m: output_sum(m(x)), (x,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classifier", CLASSIFICATION_FOR_KINDS, indirect=True)
def test_classification_model_with_kind(classifier, kind):
    model, x = copy.deepcopy(classifier)
    check_kind(model, kind, x)


@pytest.mark.parametrize("classifier", QAREPVGG, indirect=True)
def test_classification_model_with_qarepvgg(classifier):
    model, x = copy.deepcopy(classifier)
    check_kind(model, "qarepvgg", x)


@pytest.mark.parametrize("segmenter", SEGMENTATION, indirect=True)
def test_segmentation_model(segmenter):
    model, x = copy.deepcopy(segmenter)
    check_round_trip(model, lambda m: output_sum(m(x)), (x,))


@pytest.mark.parametrize("kind", (*KINDS, "qarepvgg"))
@pytest.mark.parametrize("segmenter", SEGMENTATION_FOR_KINDS, indirect=True)
def test_segmentation_model_with_kind(segmenter, kind):
    model, x = copy.deepcopy(segmenter)
    check_kind(model, kind, x)


def _targets(name):
    target = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
    if name.startswith("maskrcnn"):
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        target["masks"][0, 6:50, 4:40] = 1
    if name.startswith("keypointrcnn"):
        target["keypoints"] = torch.tensor([[[10.0, 10.0, 1.0]] * 17])
    return [target, target]


@pytest.mark.parametrize("name", DETECTION)
def test_detection_model(name):
    kwargs = {} if name.startswith("ssd") else {"min_size": 64, "max_size": 96}
    model = models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    # Two images: a converted conv without BN gains BN branches, which need more than one value per channel.
    images = [torch.rand(3, 64, 64) for _ in range(2)]

    def train_step(m):
        return sum(m(images, _targets(name)).values())

    check_round_trip(model, train_step, (images,))
