import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acnet_convert.kernels import (
    avg_pool_kernel,
    bn_zero_output,
    centre_slices,
    channel_moments,
    compose_1x1_kxk,
    fold_bn,
    identity_kernel,
    pointwise_moments,
    sum_branches,
)


def test_fold_bn_matches_conv_then_bn_in_eval():
    conv = nn.Conv2d(3, 4, 3, bias=True).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b), bn(conv(x)), rtol=0, atol=1e-12)


def test_fold_bn_without_affine_or_bias():
    bn = nn.BatchNorm2d(2, affine=False)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    w, b = fold_bn(torch.ones(2, 1, 3, 3, dtype=torch.float64), None, bn.double())
    scale = 1 / (4.0 + bn.eps) ** 0.5
    torch.testing.assert_close(w, torch.full((2, 1, 3, 3), scale, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(b, torch.full((2,), -scale, dtype=torch.float64), rtol=0, atol=1e-15)


def test_sum_branches_places_row_and_column_at_the_centre():
    square = (torch.zeros(1, 1, 3, 5, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    row = (torch.arange(5.0, dtype=torch.float64).reshape(1, 1, 1, 5), torch.tensor([2.0], dtype=torch.float64))
    col = (torch.ones(1, 1, 3, 1, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64))
    w, b = sum_branches([square, row, col], (3, 5))
    expected = torch.zeros(3, 5, dtype=torch.float64)
    expected[1] += torch.arange(5.0, dtype=torch.float64)
    expected[:, 2] += 1
    assert torch.equal(w[0, 0], expected)
    assert b.item() == 6.0


def test_centre_slices_works_in_3d_and_rejects_even_offsets():
    assert centre_slices((1, 3, 1), (3, 3, 5)) == (slice(1, 2), slice(0, 3), slice(2, 3))
    with pytest.raises(ValueError):
        centre_slices((2,), (5,))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_bn_into_a_transposed_conv(groups):
    conv = nn.ConvTranspose2d(4, 6 if groups != 4 else 8, 3, stride=2, groups=groups, bias=True).double()
    bn = nn.BatchNorm2d(conv.out_channels).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    bn.eval()
    w, b = fold_bn(conv.weight, conv.bias, bn, transposed=True, groups=groups)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    got = nn.functional.conv_transpose2d(x, w, b, stride=2, groups=groups)
    torch.testing.assert_close(got, bn(conv(x)), rtol=0, atol=1e-12)


def test_identity_kernel_is_the_identity_map_of_a_grouped_conv_and_repeats_inputs_when_wider():
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    eye = identity_kernel(6, 6, 3, dtype=torch.float64)
    assert torch.equal(nn.functional.conv2d(x, eye, groups=3), x)
    wide = identity_kernel(12, 6, 3, dtype=torch.float64)  # each group's two inputs, each copied twice
    got = nn.functional.conv2d(x, wide, groups=3)
    assert torch.equal(got, x.reshape(2, 3, 1, 2, 4, 4).expand(2, 3, 2, 2, 4, 4).reshape(2, 12, 4, 4))


@pytest.mark.parametrize("groups, kernel, stride", [(1, (3, 3), 1), (2, (3, 5), 2), (4, (1, 3), (2, 1))])
def test_avg_pool_kernel_equals_average_pooling_with_zero_padding_counted(groups, kernel, stride):
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    pad = (kernel[0] // 2, kernel[1] // 2)
    want = nn.functional.avg_pool2d(x, kernel, stride, pad, count_include_pad=True)
    weight = avg_pool_kernel(4, kernel, groups, dtype=torch.float64)
    got = nn.functional.conv2d(x, weight, None, stride, pad, groups=groups)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)  # absolute, float64, inputs of order 1


@pytest.mark.parametrize("groups, mid", [(1, 4), (2, 4), (2, 8), (4, 8)])
def test_compose_1x1_kxk_equals_the_two_convs_with_the_first_bias_as_padding(groups, mid):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    w1, b1 = torch.randn(mid, 4 // groups, 1, 1, dtype=torch.float64), torch.randn(mid, dtype=torch.float64)
    w2, b2 = torch.randn(8, mid // groups, 3, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    inner = nn.functional.conv2d(x, w1, b1, groups=groups)
    padded = b1.reshape(1, -1, 1, 1).expand(2, mid, 10, 11).clone()  # padding 2 on each side of both axes
    padded[..., 2:-2, 2:-2] = inner
    want = nn.functional.conv2d(padded, w2, b2, stride=2, groups=groups)
    weight, bias = compose_1x1_kxk((w1, b1), (w2, b2), groups)
    got = nn.functional.conv2d(x, weight, bias, stride=2, padding=2, groups=groups)
    assert weight.shape == (8, 4 // groups, 3, 5)
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()  # relative, float64


def test_compose_1x1_kxk_is_differentiable_and_keeps_the_dtype():
    w1 = torch.randn(4, 2, 1, 1, requires_grad=True)
    weight, bias = compose_1x1_kxk((w1, torch.ones(4)), (torch.randn(4, 2, 3, 3), torch.zeros(4)), 2)
    assert weight.dtype == bias.dtype == torch.float32
    weight.sum().backward()
    assert w1.grad is not None and w1.grad.abs().sum() > 0


def test_bn_zero_output_is_what_an_eval_bn_gives_a_zero_input():
    for affine in (True, False):
        bn = nn.BatchNorm2d(3, affine=affine).double()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            if affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-1, 1)
        want = bn.eval()(torch.zeros(1, 3, 1, 1, dtype=torch.float64)).flatten()
        got = bn_zero_output(bn, torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)  # absolute, float64, values of order 1


@pytest.mark.parametrize("groups, cin, cout", [(1, 4, 6), (2, 4, 6), (4, 4, 8)])
def test_pointwise_moments_from_channel_moments_equal_those_of_the_1x1_output(groups, cin, cout):
    x = torch.randn(3, cin, 5, 6, dtype=torch.float64) * 2 + torch.arange(cin, dtype=torch.float64).reshape(1, -1, 1, 1)
    weight = torch.randn(cout, cin // groups, 1, 1, dtype=torch.float64)
    var, mean = torch.var_mean(F.conv2d(x, weight, groups=groups), (0, 2, 3), correction=0)
    got_mean, got_var = pointwise_moments(weight, *channel_moments(x, groups), groups)
    assert (got_mean - mean).abs().max() <= 1e-12 * mean.abs().max()  # relative, float64
    assert (got_var - var).abs().max() <= 1e-12 * var.abs().max()  # relative, float64


def _moments_by_definition(x, groups):
    mean = x.mean((0, 2, 3))
    centred = (x - mean.reshape(1, -1, 1, 1)).reshape(x.shape[0], groups, x.shape[1] // groups, -1)
    return mean, torch.einsum("ngip,ngjp->gij", centred, centred) / (centred.shape[0] * centred.shape[3])


@pytest.mark.parametrize("groups, channels", [(1, 4), (2, 6), (3, 3)])
def test_channel_moments_and_their_gradient_equal_those_of_the_definition(groups, channels):
    x = torch.randn(3, channels, 4, 5, dtype=torch.float64, requires_grad=True)
    grad_mean = torch.randn(channels, dtype=torch.float64)
    grad_cov = torch.randn(groups, channels // groups, channels // groups, dtype=torch.float64)
    results = []
    for moments in (channel_moments, _moments_by_definition):
        mean, cov = moments(x, groups)
        (grad,) = torch.autograd.grad((mean * grad_mean).sum() + (cov * grad_cov).sum(), x)
        results.append((mean.detach(), cov.detach(), grad))
    for got, want in zip(*results):
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()  # relative, float64
