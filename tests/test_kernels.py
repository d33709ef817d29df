import pytest
import torch
from torch import nn

from acnet_convert.kernels import centre_slices, fold_bn, sum_branches


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
