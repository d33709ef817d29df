"""Every torchvision classification, segmentation and detection model: convert, train a step, deploy exactly."""

import pytest
import torch
from torch import nn
from torchvision import models

from acnet_convert import ACBlock, acify, deploy, verify

# Small inputs keep the suite fast; these models need a particular size (the rest run at 32x32).
INPUT_SIZE = {"alexnet": 64, "googlenet": 64, "inception_v3": 299, "maxvit_t": 224, "vit_h_14": 28}
VIT = {name for name in models.list_models(module=models) if name.startswith("vit_")}

CLASSIFICATION = models.list_models(module=models)
SEGMENTATION = models.list_models(module=models.segmentation)
DETECTION = models.list_models(module=models.detection)


def eligible_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Plain Conv2d layers whose kernel sides are odd and at least 3: the ones ACNet applies to."""
    return [m for m in model.modules() if type(m) is nn.Conv2d and all(k % 2 and k >= 3 for k in m.kernel_size)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrate_bn(model, inputs):
    """Set every BatchNorm's running statistics to those of the eval-mode network on ``inputs``.

    After a single step from random init the running statistics are far from the real ones, and eval mode then
    amplifies any difference exponentially with depth; calibrated, eval mode is well conditioned.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(*inputs)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def check_round_trip(model, train_step, eval_inputs):
    """acify, train one step, deploy, and compare eval outputs.

    The comparison runs in float64, so that it measures the conversion rather than float32 rounding amplified by a
    randomly initialised deep network (float32 exactness is checked layer by layer in test_block.py).
    """
    eligible = eligible_convs(model)
    acified = acify(model, init="scratch", example_inputs=eval_inputs)
    report = acified.acnet_plan
    assert len(report.converted) == len(eligible)
    assert sum(isinstance(m, ACBlock) for m in acified.modules()) == len(eligible)

    acified.train()
    loss = train_step(acified)
    loss.backward()
    assert all(b.branches["hor"].conv.weight.grad is not None for b in acified.modules() if isinstance(b, ACBlock))

    calibrate_bn(acified, eval_inputs)
    acified.double()
    deployed = deploy(acified)
    assert not any(isinstance(m, ACBlock) for m in deployed.modules())
    assert type(deployed) is type(model)
    verify(acified, deployed, *_double(eval_inputs), rtol=1e-6)  # the issue asks 1e-4; float64 does better

    absorbed = sum(n_params(model.get_submodule(s.bn)) for s in report.converted if s.bn)
    added_bias = sum(c.out_channels for c in eligible if c.bias is None)
    assert n_params(deployed) == n_params(model) - absorbed + added_bias


def _double(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.double()
    return type(inputs)(_double(x) for x in inputs)


def _output_sum(out):
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        return sum(_output_sum(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return sum(_output_sum(v) for v in out)
    return 0.0


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_model(name):
    size = INPUT_SIZE.get(name, 32)
    model = models.get_model(name, weights=None, **({"image_size": size} if name in VIT else {}))
    x = torch.randn(2, 3, size, size)
    check_round_trip(model, lambda m: _output_sum(m(x)), (x,))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model(name):
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    model = models.get_model(name, weights=None, weights_backbone=None, **aux)
    x = torch.randn(2, 3, 64, 64)
    check_round_trip(model, lambda m: _output_sum(m(x)), (x,))


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
