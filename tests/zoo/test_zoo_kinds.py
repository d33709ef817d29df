"""Every torchvision classification and segmentation model with the DBB and RepVGG block kinds (QARepVGG, whose
branches are RepVGG's with the BatchNorms moved, on one model of each architecture): preserve init, a train step,
exact deployment, parameter counts."""

import pytest
import torch
from roundtrip import calibrate_bn, eligible_convs, n_params, output_sum
from test_training_zoo import give_bn_statistics
from test_zoo import INPUT_SIZE, VIT
from torch import nn
from torchvision import models

from acnet_convert import acify, deploy
from acnet_convert.blocks.registry import is_block

KINDS = ("dbb", "repvgg")
# One model per architecture family for QARepVGG (and every segmentation model below): plain, strided, grouped
# (ResNeXt, RegNet), depthwise (MobileNet, EfficientNet, ConvNeXt 7x7) and rectangular (Inception) convs occur
# among them, dilated ones in the segmentation backbones.
QAREPVGG = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
            "vgg11_bn", "wide_resnet50_2")  # fmt: skip
CASES = [(name, kind) for name in models.list_models(module=models) for kind in KINDS] + [
    (name, "qarepvgg") for name in QAREPVGG
]
LARGEST_CONVS = 100_000_000  # conv weights above which only the first eight eligible convs are converted (memory)
SEGMENTATION = models.list_models(module=models.segmentation)

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_kinds(model: nn.Module, kind: str) -> dict[str, str]:
    """The kind each conv should get, by the rules of each block, counted without the library: plain Conv2d with
    odd sides other than 1x1 (and, for DBB, no dilation) take ``kind``; other convs ACB can take fall back to it."""
    acb = {id(m) for m in eligible_convs(model)}
    expected = {}
    for name, m in model.named_modules():
        sides = getattr(m, "kernel_size", ())
        takes = type(m) is nn.Conv2d and all(k % 2 for k in sides) and max(sides) > 1
        if takes and (kind != "dbb" or m.dilation == (1, 1)):
            expected[name] = kind
        elif id(m) in acb:
            expected[name] = "acb"
    return expected


def check_kind(model: nn.Module, kind: str, x: torch.Tensor) -> None:
    """Convert and deploy in place (one copy of the model in memory), comparing outputs taken before each step."""
    give_bn_statistics(model)
    model.eval()
    expected = expected_kinds(model, kind)
    include = None
    if sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)) > LARGEST_CONVS:
        include = list(expected)[:8]  # the first eight: memory, not coverage, is the limit
        expected = {name: expected[name] for name in include}
    sizes = {name: (n_params(m), getattr(m, "out_channels", 0)) for name, m in model.named_modules()}
    original_params = n_params(model)
    with torch.no_grad():
        want = model(x)
    acified = acify(model, inplace=True, block=kind, include=include, init="preserve", example_inputs=(x,))
    with torch.no_grad():
        assert_outputs_close(want, acified(x), rtol=1e-5)  # preserve init: the new branches add exact zeros
    report = acified.acnet_plan
    assert {s.name: s.kind for s in report.converted} == expected
    if not expected:
        return  # no eligible conv (ViT, Swin: even patch kernels): the model is unchanged, nothing to deploy

    acified.train()
    output_sum(acified(x)).backward()
    new_kernels = [p for m in acified.modules() if is_block(m) for n, p in m.named_parameters() if "weight" in n]
    assert new_kernels and all(p.grad is not None for p in new_kernels)
    acified.zero_grad(set_to_none=True)
    calibrate_bn(acified, (x,))
    acified.double()
    with torch.no_grad():
        trained = acified(x.double())
        deployed = deploy(acified, inplace=True)
        assert_outputs_close(trained, deployed(x.double()), rtol=1e-6)  # float64: the conversion alone
    absorbed = sum(sizes[s.bn][0] for s in report.converted if s.bn)
    added_bias = sum(sizes[s.name][1] for s in report.converted if not s.conv_bias)
    assert n_params(deployed) == original_params - absorbed + added_bias


def assert_outputs_close(want, got, rtol: float) -> None:
    """Every output tensor within ``rtol`` x max(1, max|want|) (the bound ``verify`` uses)."""
    pairs = list(zip(tensors(want), tensors(got), strict=True))
    assert pairs
    for a, b in pairs:
        assert (a - b).abs().max().item() <= rtol * max(1.0, a.abs().max().item())


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = [out[k] for k in sorted(out)] if isinstance(out, dict) else list(out)
    return [t for v in values for t in tensors(v)]


@pytest.mark.parametrize("name,kind", CASES)
def test_classification_model(name, kind):
    size = INPUT_SIZE.get(name, 32)
    model = models.get_model(name, weights=None, **({"image_size": size} if name in VIT else {}))
    check_kind(model, kind, torch.randn(2, 3, size, size))


@pytest.mark.parametrize("kind", (*KINDS, "qarepvgg"))
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model(name, kind):
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    model = models.get_model(name, weights=None, weights_backbone=None, **aux)
    check_kind(model, kind, torch.randn(2, 3, 64, 64))
