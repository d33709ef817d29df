"""Shared by the model-zoo tests: acify, train a step, deploy, and compare."""

import torch
from torch import nn

from acnet_convert import ACBlock, acify, deploy, verify
from acnet_convert.blocks import is_block


def eligible_convs(model: nn.Module) -> list[nn.Module]:
    """Plain convs of the supported kinds whose sides are odd, at least two of them >= 3: the ones ACNet applies to."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)  # subclasses count unless they change forward()
    return [m for m in model.modules() if any(isinstance(m, k) and type(m).forward is k.forward for k in kinds)
            and all(k % 2 for k in m.kernel_size) and sum(k >= 3 for k in m.kernel_size) >= 2]  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (parameter count, out_channels or 0), taken before an in-place conversion replaces them."""
    return {name: (n_params(m), getattr(m, "out_channels", 0)) for name, m in model.named_modules()}


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


def check_round_trip(model, train_step, eval_inputs, **acify_options):
    """acify ``model`` in place, train one step, deploy, and compare eval outputs.

    The comparison runs in float64, so that it measures the conversion rather than float32 rounding amplified by a
    randomly initialised deep network (float32 exactness is checked layer by layer in test_block.py).
    """
    model_class, original_params, sizes = type(model), n_params(model), module_sizes(model)
    eligible = eligible_convs(model)
    added_bias = sum(c.out_channels for c in eligible if c.bias is None)
    acified = acify(model, inplace=True, init="scratch", example_inputs=eval_inputs, **acify_options)
    plan = acified.acnet_plan
    assert len(plan.converted) == len(eligible)
    assert sum(isinstance(m, ACBlock) for m in acified.modules()) == len(eligible)

    acified.train()
    loss = train_step(acified)
    loss.backward()
    blocks = [m for m in acified.modules() if isinstance(m, ACBlock)]
    assert all(br.conv.weight.grad is not None for b in blocks for n, br in b.branches.items() if n != "square")
    acified.zero_grad(set_to_none=True)  # memory: the gradients are not needed any more

    calibrate_bn(acified, eval_inputs)
    acified.double()
    deployed = deploy(acified)
    assert not any(isinstance(m, ACBlock) for m in deployed.modules())
    assert type(deployed) is model_class
    verify(acified, deployed, *_double(eval_inputs), rtol=1e-6)  # float64 allows far tighter than 1e-4

    absorbed = sum(sizes[s.bn][0] for s in plan.converted if s.bn)
    assert n_params(deployed) == original_params - absorbed + added_bias


def kind_takes(kind: str, m: nn.Module) -> bool:
    """Whether ``kind`` takes ``m``, by its rules, decided without the library: a Conv2d (or a subclass keeping its
    forward) with odd sides, other
    than 1x1 (MobileOne takes 1x1 convs too); for DBB without dilation; for the dilated kind a depthwise KxK conv
    with K >= 5 and no dilation."""
    sides = getattr(m, "kernel_size", ())
    keeps_forward = isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward
    if not (keeps_forward and all(k % 2 for k in sides)):
        return False
    if kind == "mobileone":
        return True
    if kind == "dilated":
        depthwise = m.groups == m.in_channels == m.out_channels
        return depthwise and sides[0] == sides[1] >= 5 and m.dilation == (1, 1)
    return max(sides) > 1 and (kind != "dbb" or m.dilation == (1, 1))


def expected_kinds(model: nn.Module, kind: str) -> dict[str, str]:
    """The kind each conv should get, counted without the library: ``kind`` where it takes the conv
    (``kind_takes``); other convs ACB can take fall back to it."""
    acb = {id(m) for m in eligible_convs(model)}
    expected = {}
    for name, m in model.named_modules():
        if kind_takes(kind, m):
            expected[name] = kind
        elif id(m) in acb:
            expected[name] = "acb"
    return expected


# Over 60 M parameters, or the slowest of a family: one after another on one worker, and only ACB on them (each
# family has a smaller member on which every kind is checked).
LARGEST = {"regnet_y_128gf", "vit_h_14", "regnet_y_32gf", "regnet_x_32gf", "vit_l_16", "vit_l_32", "convnext_large",
           "wide_resnet101_2", "efficientnet_b7"}  # fmt: skip
LARGEST_CONVS = 100_000_000  # conv weights above which only the first eight eligible convs are converted (memory)


def check_kind(model: nn.Module, kind: str, x: torch.Tensor, deploy_rtol: float = 1e-6) -> None:
    """Convert and deploy in place (one copy of the model in memory), comparing outputs taken before each step:
    preserve init, a train step, exact deployment in float64 (within ``deploy_rtol``), parameter counts."""
    give_bn_statistics(model)
    model.eval()
    expected = expected_kinds(model, kind)
    include = None
    if sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)) > LARGEST_CONVS:
        include = list(expected)[:8]  # the first eight: memory, not coverage, is the limit
        expected = {name: expected[name] for name in include}
    sizes = module_sizes(model)
    original_params = n_params(model)
    with torch.no_grad():
        want = model(x)
    acified = acify(model, inplace=True, block=kind, include=include, init="preserve", example_inputs=(x,))
    with torch.no_grad():
        assert_outputs_close(want, acified(x), rtol=1e-5)  # preserve init: the new branches add exact zeros
    plan = acified.acnet_plan
    assert {s.name: s.kind for s in plan.converted} == expected
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
        assert_outputs_close(trained, deployed(x.double()), rtol=deploy_rtol)  # float64: the conversion alone
    absorbed = sum(sizes[s.bn][0] for s in plan.converted if s.bn)
    added_bias = sum(sizes[s.name][1] for s in plan.converted if not s.conv_bias)
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


def _double(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.double()
    return type(inputs)(_double(x) for x in inputs)


def output_sum(out):
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        return sum(output_sum(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return sum(output_sum(v) for v in out)
    return 0.0
