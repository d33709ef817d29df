"""Fast mode: FastACBlock's composed kernel, its training, and its exact deployment."""

import pytest
import torch
import torch.nn.functional as F
from testkit import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet_convert import ACBlock, ACNetError, FastACBlock, acify, deploy, plan, verify
from acnet_convert.blocks.geometry import branch_geometry, pad_like_conv, resolve_padding


@st.composite
def conv_configs(draw):
    """A float64 Conv2d with odd kernel sides >= 3 and any other option, and an input it accepts."""
    kh, kw = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([3, 5]))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from([0, 1, 3, (2, 0), (0, 4), "same", "valid"]))
    stride = 1 if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    groups = draw(st.sampled_from([1, 2]))
    extent = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    size = (extent[0] + draw(st.integers(0, 4)), extent[1] + draw(st.integers(0, 4)))
    pad = resolve_padding((padding, padding) if isinstance(padding, int) else padding, (kh, kw), dilation)
    modes = ["zeros", "replicate"] + (["reflect", "circular"] if all(p < s for p, s in zip(pad, size)) else [])
    conv = nn.Conv2d(
        2 * groups, 2 * draw(st.sampled_from([1, 2])), (kh, kw), stride, padding, dilation, groups,
        draw(st.booleans()), draw(st.sampled_from(modes)), dtype=torch.float64,
    )  # fmt: skip
    return conv, torch.randn(2, conv.in_channels, *size, dtype=torch.float64)


def randomize_scales(block: FastACBlock) -> None:
    with torch.no_grad():
        for name in ("scale_square", "scale_hor", "scale_ver"):
            getattr(block, name).uniform_(-1.5, 1.5)


def separate_branches(block: FastACBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output computed the long way: each scaled branch as its own conv (ACNet geometry), summed."""
    padding = resolve_padding(block.padding, block.kernel_size, block.dilation)
    out = block.bias.reshape(-1, 1, 1) if block.bias is not None else 0
    for weight, scale in ((block.weight, block.scale_square), (block.weight_hor, block.scale_hor),
                          (block.weight_ver, block.scale_ver)):  # fmt: skip
        geo = branch_geometry(block.kernel_size, weight.shape[2:], padding, block.dilation)
        crop = tuple(slice(c, size - c) for c, size in zip(geo.crop, x.shape[2:]))
        conv = nn.Conv2d(block.in_channels, block.out_channels, geo.kernel, block.stride, geo.padding, block.dilation,
                         block.groups, False, block.padding_mode, dtype=x.dtype)  # fmt: skip
        scaled = {"weight": weight * scale.reshape(-1, 1, 1, 1)}
        out = out + torch.func.functional_call(conv, scaled, (x[(..., *crop)],))
    return out


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=conv_configs())
def test_composed_kernel_equals_the_three_scaled_branches_run_separately(case):
    conv, x = case
    block = FastACBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    with torch.no_grad():
        want, got = separate_branches(block, x), block(x)
    assert got.shape == conv(x).shape
    assert (want - got).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())  # float64 rounding only


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=conv_configs(), input_grad=st.booleans())
def test_gradients_equal_autograd_through_the_plain_composition(case, input_grad):
    conv, x = case
    block = FastACBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    x.requires_grad_(input_grad)
    params = [p for p in block.parameters()]

    def plain(x):  # the composed kernel kept for backward, as autograd does it
        if block.padding_mode != "zeros":
            x = pad_like_conv(x, block.explicit_padding, block.padding_mode)
            return F.conv2d(x, block.composed_weight(), block.bias, block.stride, 0, block.dilation, block.groups)
        return F.conv2d(x, block.composed_weight(), block.bias, block.stride, block.padding, block.dilation,
                        block.groups)  # fmt: skip

    inputs = params + ([x] if input_grad else [])
    grad_out = torch.randn_like(block(x))
    want = torch.autograd.grad(plain(x), inputs, grad_out)
    got = torch.autograd.grad(block(x), inputs, grad_out)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() <= 1e-12 * max(1.0, w.abs().max().item())  # float64 rounding only


def test_composed_kernel_is_differentiable_to_second_order():
    conv = nn.Conv2d(1, 2, (3, 5), padding=1, bias=True, dtype=torch.float64)
    block = FastACBlock.from_conv(conv, init="scratch")
    randomize_scales(block)
    names = ["weight", "bias", "weight_hor", "weight_ver", "scale_square", "scale_hor", "scale_ver"]
    x = torch.randn(1, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [getattr(block, n).detach().requires_grad_() for n in names]

    def run(x, *values):
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))  # finite differences, float64 default tolerances
    assert torch.autograd.gradgradcheck(run, (x, *params))


def test_preserve_init_is_the_original_conv_bit_for_bit_and_keeps_its_parameters():
    conv = nn.Conv2d(3, 5, (5, 3), stride=2, padding=(1, 2), dilation=(1, 2), bias=True, padding_mode="reflect")
    block = FastACBlock.from_conv(conv)
    x = torch.randn(2, 3, 12, 11)
    assert torch.equal(block(x), conv(x))
    assert block.weight is conv.weight and block.bias is conv.bias
    assert torch.all(block.scale_square == 1) and torch.all(block.scale_hor == 0) and torch.all(block.scale_ver == 0)


def test_scratch_init_starts_the_new_branches_at_gamma_init_and_the_square_at_one():
    block = FastACBlock.from_conv(nn.Conv2d(3, 4, 3), init="scratch", gamma_init=0.25)
    assert torch.all(block.scale_square == 1)
    assert torch.all(block.scale_hor == 0.25) and torch.all(block.scale_ver == 0.25)
    assert block.weight_hor.shape == (4, 3, 1, 3) and block.weight_ver.shape == (4, 3, 3, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 5, padding=2, stride=2, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(4, 3, 10, 10)


def test_fast_mode_keeps_every_batchnorm_and_reports_it():
    model = acify(Net(), mode="fast")
    assert isinstance(model.conv1, FastACBlock) and isinstance(model.bn1, nn.BatchNorm2d)
    sites = {s.name: s for s in model.acnet_plan.sites}
    assert sites["conv1"].action == "convert" and sites["conv1"].bn is None
    assert "bn1 stays" in sites["conv1"].reason
    again = plan(model)
    assert [s.action for s in again.sites] == ["done", "done"] and "FastACBlock" in again.sites[0].reason


def test_preserve_init_keeps_the_function_in_train_and_eval_mode():
    model = Net()
    randomize_bn(model, X)
    fast = acify(model, mode="fast")
    for training in (True, False):
        model.train(training), fast.train(training)
        assert torch.equal(fast(X), model(X))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_deploy_of_a_fast_model_is_exact_and_gives_back_the_original_architecture(dtype, tolerance):
    original = Net().to(dtype)
    fast = acify(original, mode="fast", init="scratch")
    for block in (fast.conv1, fast.conv2):
        randomize_scales(block)
    randomize_bn(fast, X.to(dtype))
    fast.eval()
    deployed = deploy(fast)
    assert [type(m) for m in deployed.modules()] == [type(m) for m in original.modules()]
    assert deployed.conv1.bias is not None and deployed.conv2.bias is None  # as in the original
    original.load_state_dict(deployed.state_dict())  # same keys and shapes, strictly
    verify(fast, deployed, X.to(dtype), rtol=tolerance)  # relative to max(1, max |output|)


def test_fast_mode_trains():
    fast = acify(Net(), mode="fast", init="scratch")
    optimizer = torch.optim.Adam(fast.parameters(), lr=0.01)
    y = torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(fast(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.all(fast.conv2.scale_hor == 1), "the branch scales must be trained too"
    assert fast.conv2.weight_ver.grad.abs().sum() > 0


def test_exact_and_fast_blocks_in_one_model_deploy_together():
    exact_first = acify(Net(), include="conv1", init="scratch")
    mixed = acify(exact_first, mode="fast", init="scratch")
    assert isinstance(mixed.conv1, ACBlock) and isinstance(mixed.conv2, FastACBlock)
    randomize_scales(mixed.conv2)
    randomize_bn(mixed, X)
    deployed = deploy(mixed)
    assert not any(isinstance(m, (ACBlock, FastACBlock)) for m in deployed.modules())
    verify(mixed, deployed, X, rtol=1e-5)  # float32


def test_fast_block_constructor_builds_a_scratch_block():
    block = FastACBlock(3, 4, (3, 5), padding=(1, 2), bias=True)
    assert block(torch.randn(1, 3, 7, 7)).shape == (1, 4, 7, 7)
    assert torch.all(block.scale_hor == 1) and block.fuse().bias is not None


def test_bad_mode_and_kernels_are_clear_errors():
    with pytest.raises(ACNetError, match="unknown mode 'slow': use one of exact, fast"):
        acify(Net(), mode="slow")
    with pytest.raises(ACNetError, match="odd kernel sides"):
        FastACBlock(3, 4, (3, 4))
    with pytest.raises(ACNetError, match="unknown init 'zero'"):
        FastACBlock.from_conv(nn.Conv2d(1, 1, 3), init="zero")
    with pytest.raises(ACNetError, match="for a single block call block.fuse"):
        deploy(FastACBlock(1, 1, 3))


def test_symbolic_tracing_records_the_same_block():
    fast = acify(Net(), mode="fast", init="scratch")
    for block in (fast.conv1, fast.conv2):
        randomize_scales(block)
    traced = torch.fx.symbolic_trace(fast)
    assert not any(isinstance(m, FastACBlock) for m in traced.modules())  # traced through, into plain operations
    assert torch.allclose(traced(X), fast(X), rtol=1e-6, atol=1e-6)  # float32, the same operations
    traced(X).square().sum().backward()
    assert fast.conv2.scale_ver.grad is not None  # the traced graph trains the block's own parameters


def test_per_sample_gradients_with_vmap_equal_one_backward_per_sample():
    block = FastACBlock.from_conv(nn.Conv2d(2, 3, 3, padding=1, groups=1, dtype=torch.float64), init="scratch")
    randomize_scales(block)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    params = {name: p.detach() for name, p in block.named_parameters()}

    def loss(values, sample):
        return torch.func.functional_call(block, values, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        block.zero_grad()
        block(x[i : i + 1]).square().sum().backward()
        for name, p in block.named_parameters():
            assert (per_sample[name][i] - p.grad).abs().max().item() <= 1e-12 * max(1.0, p.grad.abs().max().item())
