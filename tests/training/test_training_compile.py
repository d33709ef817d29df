"""torch.compile (inductor, CPU): an acified model trains like eager, and the deployed model compiles too."""

import copy

import pytest
import torch
from torch.nn import functional as F

from acnet_convert import acify, deploy
from acnet_convert.demo.models import SmallCNN


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_compiled_acified_model_trains_like_eager_and_deployed_model_compiles(mode):
    eager = acify(SmallCNN(in_channels=3, num_classes=4, width=4), init="scratch", mode=mode)
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, backend="inductor", fullgraph=True)  # no graph break: all of it compiles
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    losses = {}
    runs = [("eager", eager, eager.parameters()), ("compiled", compiled, compiled_copy.parameters())]
    for name, model, params in runs:
        optimizer = torch.optim.SGD(params, lr=0.05)
        losses[name] = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    # Inductor fuses and reorders float32 arithmetic, so agreement is to rounding, not bit for bit.
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert losses["eager"][-1] < losses["eager"][0], "the steps trained"

    deployed = deploy(compiled_copy).eval()
    compiled_copy.eval()
    with torch.no_grad():
        want = compiled_copy(x)
        got = torch.compile(deployed, backend="inductor", fullgraph=True)(x)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())  # fusion is exact; float32 rounding
