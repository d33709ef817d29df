"""What every check shares: the floating-point tensors of an output, layer outputs, and the modes a check keeps."""

import torch
from torch import nn

from acnet_convert import acify, quant_report, verify
from acnet_convert.checks.outputs import float_tensors, layer_outputs
from acnet_convert.checks.weights import quantize_symmetric


def test_float_tensors_of_a_nested_output_in_a_stable_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    out = {"z": [a, torch.arange(3)], 1: (b, "text"), "a": {"x": c, "n": None}}
    assert [t.numel() for t in float_tensors(out)] == [2, 3, 1]  # keys sorted as text: 1, "a", "z"
    assert float_tensors(torch.arange(4)) == [] and float_tensors(None) == []


def test_layer_outputs_records_each_call_and_leaves_no_hook():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    seen = []
    with layer_outputs({"0": model[0], "2": model[2]}, lambda name, out: seen.append((name, tuple(out.shape)))):
        model(torch.randn(5, 4))
        model(torch.randn(1, 4))
    assert seen == [("0", (5, 3)), ("2", (5, 2)), ("0", (1, 3)), ("2", (1, 2))]
    model(torch.randn(1, 4))
    assert len(seen) == 4 and not any(m._forward_hooks for m in model.modules())


def mixed_modes(model: nn.Module) -> nn.Module:
    """``model`` in train mode with its ReLU (index 2) left in eval mode."""
    model.train()
    model[2].eval()
    return model


def test_checks_run_in_eval_mode_and_keep_every_submodule_mode():
    acified = mixed_modes(acify(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())))
    plain = mixed_modes(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    for model, check in ((acified, lambda: verify(acified, acified, x, layers=True)),
                         (plain, lambda: quant_report(plain, inputs=x, ptq=False))):  # fmt: skip
        modes = {name: m.training for name, m in model.named_modules()}
        running_mean = model[1].running_mean.clone() if isinstance(model[1], nn.BatchNorm2d) else None
        check()
        assert {name: m.training for name, m in model.named_modules()} == modes
        if running_mean is not None:  # ran in eval mode: the BatchNorm's statistics did not move
            assert torch.equal(model[1].running_mean, running_mean)


def test_symmetric_quantiser_rounds_to_its_grid_and_keeps_zero_rows():
    w = torch.tensor([[0.0, 0.49, -1.0, 0.51], [0.0, 0.0, 0.0, 0.0]])
    peak = w.abs().amax(1, keepdim=True)
    q = quantize_symmetric(w, peak, 2)  # 2 bits: levels -1, 0, 1 times max|w|
    assert torch.equal(q, torch.tensor([[0.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    q8 = quantize_symmetric(w, w.abs().max().item(), 8)
    assert torch.allclose(q8, (w * 127).round() / 127) and (q8 - w).abs().max() <= 0.5 / 127
