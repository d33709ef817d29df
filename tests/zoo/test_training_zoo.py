"""init="preserve" on every torchvision classification model: the acified model computes the original function."""

import pytest
import torch
from test_zoo import INPUT_SIZE, VIT
from torch import nn
from torchvision import models

from acnet_convert import ACBlock, acify

CLASSIFICATION = models.list_models(module=models)


pytestmark = pytest.mark.usefixtures("one_thread")


def give_bn_statistics(model: nn.Module) -> None:
    """Set every BatchNorm's affine parameters and running statistics to mild random values (no forward pass)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.25)
                if m.affine:
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_preserve_init_keeps_the_eval_output_of_every_torchvision_classifier(name):
    size = INPUT_SIZE.get(name, 32)
    model = models.get_model(name, weights=None, **({"image_size": size} if name in VIT else {})).eval()
    give_bn_statistics(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model(x)
    acified = acify(model, inplace=True)  # in place: no copy of the largest models; `want` was taken before
    with torch.no_grad():
        got = acified(x)
    converted = acified.acnet_plan.converted
    assert sum(isinstance(m, ACBlock) for m in acified.modules()) == len(converted)
    assert torch.isfinite(want).all()
    # Bound relative to max(1, max|want|); the new branches contribute exact zeros, so it holds in float32.
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
