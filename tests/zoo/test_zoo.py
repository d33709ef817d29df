"""Every torchvision classification, segmentation and detection model: convert, train a step, deploy exactly."""

import pytest
import torch
from torchvision import models

from roundtrip import check_round_trip, output_sum

# Small inputs keep the suite fast; these models need a particular size (the rest run at 32x32).
INPUT_SIZE = {"alexnet": 64, "googlenet": 64, "inception_v3": 299, "maxvit_t": 224, "vit_h_14": 28}
VIT = {name for name in models.list_models(module=models) if name.startswith("vit_")}

CLASSIFICATION = models.list_models(module=models)
SEGMENTATION = models.list_models(module=models.segmentation)
DETECTION = models.list_models(module=models.detection)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_model(name):
    size = INPUT_SIZE.get(name, 32)
    model = models.get_model(name, weights=None, **({"image_size": size} if name in VIT else {}))
    x = torch.randn(2, 3, size, size)
    check_round_trip(model, lambda m: output_sum(m(x)), (x,))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model(name):
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    model = models.get_model(name, weights=None, weights_backbone=None, **aux)
    x = torch.randn(2, 3, 64, 64)
    check_round_trip(model, lambda m: output_sum(m(x)), (x,))


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
