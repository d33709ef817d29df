"""RepOpt's claim, per kind: N steps of SGD on the plain conv with its gradient preconditioner give the kernel that
N steps on the explicit CSLA block (every branch trained, constant scales) give, in float64."""

import pytest
import torch
from csla import CONVS, batches, kernels, train, twins

KINDS = ("acb", "repvgg", "dbb")
STEPS = 6
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sgd", [SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.2, "weight_decay": 5e-3}],
                         ids=["nesterov", "dampening"])
def test_sgd_on_the_preconditioned_conv_is_sgd_on_the_csla_block(kind, sgd):
    csla, repopt, plain = twins(kind)
    start = kernels(repopt)
    assert all(relative(start[n], k) <= 1e-12 for n, k in kernels(csla).items())  # the same model to start with
    data = batches(STEPS)
    train(csla, data, torch.optim.SGD(csla.parameters(), **sgd))
    train(repopt, data, torch.optim.SGD(repopt.parameters(), **sgd))
    train(plain, data, torch.optim.SGD(plain.parameters(), **sgd))
    want, got, unmasked = kernels(csla), kernels(repopt), kernels(plain)
    for name in CONVS:
        assert relative(got[name], want[name]) <= 1e-10, name  # float64: only rounding differs
        moved = want[name] - start[name]
        assert relative(unmasked[name] - start[name], moved) > 1e-2, name  # plain SGD takes other steps
    for (name, p), q in zip(csla.b4.named_parameters(), repopt.b4.parameters()):
        assert relative(q.detach(), p.detach()) <= 1e-10, name  # the layers around the convs follow alike


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_moves_the_kernel_by_the_preconditioned_gradient(kind):
    """Without momentum or decay one step is -lr·P(G): the mask's values are where the update shows them."""
    csla, repopt, plain = twins(kind)
    x, y = batches(1)[0]
    start = kernels(repopt)
    train(repopt, [(x, y)], torch.optim.SGD(repopt.parameters(), lr=1.0))
    train(plain, [(x, y)], torch.optim.SGD(plain.parameters(), lr=1.0))
    train(csla, [(x, y)], torch.optim.SGD(csla.parameters(), lr=1.0))
    for name in CONVS:
        step, plain_step = kernels(repopt)[name] - start[name], kernels(plain)[name] - start[name]
        conv = getattr(repopt, name)
        predicted = plain_step * conv.repopt_mask
        if kind == "dbb":
            predicted = predicted + conv.repopt_pool * plain_step.sum((2, 3), keepdim=True)
        assert relative(step, predicted) <= 1e-10, name
        assert relative(step, kernels(csla)[name] - start[name]) <= 1e-10, name


def adamw_errors(kind: str, eps: float) -> list[float]:
    """Per conv: how far the preconditioned conv's AdamW steps are from the CSLA block's, relative to them."""
    csla, repopt, plain = twins(kind)
    start = kernels(repopt)
    data = batches(STEPS)
    adamw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 5e-2, "eps": eps}
    train(csla, data, torch.optim.AdamW(csla.parameters(), **adamw))
    train(repopt, data, torch.optim.AdamW(repopt.parameters(), **adamw))
    train(plain, data, torch.optim.AdamW(plain.parameters(), **adamw))
    want, got, unmasked = kernels(csla), kernels(repopt), kernels(plain)
    for name in CONVS:
        assert relative(unmasked[name] - start[name], want[name] - start[name]) > 1e-2, name  # the scale acts
    return [relative(got[n] - start[n], want[n] - start[n]) for n in CONVS]


@pytest.mark.parametrize("kind", ["acb", "repvgg"])
def test_adamw_on_the_preconditioned_conv_is_adamw_on_the_csla_block_up_to_eps(kind):
    """Each branch's Adam step is the kernel's times the sign of its scale, up to eps, so the two trainings differ
    by O(eps / |gradient|): here at most 1e-2 of the steps with AdamW's default eps=1e-8, and 1e-10 with
    eps=1e-16, the difference shrinking with eps (so eps is all that differs)."""
    default, tiny = adamw_errors(kind, 1e-8), adamw_errors(kind, 1e-16)
    assert max(default) <= 1e-2 and max(tiny) <= 1e-10
    assert all(t <= d * 1e-5 for t, d in zip(tiny, default))
