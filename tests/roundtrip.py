"""Shared by the model-zoo tests: acify, train a step, deploy, and compare."""

import torch
from torch import nn

from acnet_convert import ACBlock, acify, deploy, verify


def eligible_convs(model: nn.Module) -> list[nn.Module]:
    """Plain convs of the supported kinds whose sides are odd, at least two of them >= 3: the ones ACNet applies to."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)  # subclasses count unless they change forward()
    return [m for m in model.modules() if any(isinstance(m, k) and type(m).forward is k.forward for k in kinds)
            and all(k % 2 for k in m.kernel_size) and sum(k >= 3 for k in m.kernel_size) >= 2]  # fmt: skip


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


def check_round_trip(model, train_step, eval_inputs, **acify_options):
    """acify, train one step, deploy, and compare eval outputs.

    The comparison runs in float64, so that it measures the conversion rather than float32 rounding amplified by a
    randomly initialised deep network (float32 exactness is checked layer by layer in test_block.py).
    """
    eligible = eligible_convs(model)
    acified = acify(model, init="scratch", example_inputs=eval_inputs, **acify_options)
    report = acified.acnet_plan
    assert len(report.converted) == len(eligible)
    assert sum(isinstance(m, ACBlock) for m in acified.modules()) == len(eligible)

    acified.train()
    loss = train_step(acified)
    loss.backward()
    blocks = [m for m in acified.modules() if isinstance(m, ACBlock)]
    assert all(br.conv.weight.grad is not None for b in blocks for n, br in b.branches.items() if n != "square")

    calibrate_bn(acified, eval_inputs)
    acified.double()
    deployed = deploy(acified)
    assert not any(isinstance(m, ACBlock) for m in deployed.modules())
    assert type(deployed) is type(model)
    verify(acified, deployed, *_double(eval_inputs), rtol=1e-6)  # float64 allows far tighter than 1e-4

    absorbed = sum(n_params(model.get_submodule(s.bn)) for s in report.converted if s.bn)
    added_bias = sum(c.out_channels for c in eligible if c.bias is None)
    assert n_params(deployed) == n_params(model) - absorbed + added_bias


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
