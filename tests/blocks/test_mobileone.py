"""The MobileOne block (kind "mobileone"), exact and fast: fusion over 1x1, depthwise, grouped and strided convs,
its option k through the plan, the checkpoint and the command line, init, gradients, problems."""

import functools
import json
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reparam_cases import (
    assert_gradients_reach_every_kernel_and_scale,
    check_exact_fusion,
    check_preserve,
    conv_and_input,
    conv_as,
    conv_configs,
    padded,
    randomize_bn,
    randomize_scales,
    relative_error,
)  # fmt: skip
from torch import nn
from typer.testing import CliRunner

from acnet_convert import ACNetError, acify, deploy, load, save_weights
from acnet_convert.blocks.mobileone import FastMobileOneBlock, MobileOneBlock
from acnet_convert.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def mobileone_configs(draw):
    """``conv_configs`` with a third of them turned into 1x1 convs, and MobileOne's k (1 to 4)."""
    cfg = draw(conv_configs())
    if draw(st.integers(0, 2)) == 0:
        cfg.update(kernel_size=(1, 1), dilation=(1, 1))
    return cfg, draw(st.integers(1, 4))


def with_k(cls, k: int):
    """``cls`` as the shared checks call it, building blocks with ``k`` KxK branches."""
    return types.SimpleNamespace(from_conv=functools.partial(cls.from_conv, k=k), absorbs_bn=cls.absorbs_bn)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(case=mobileone_configs())
def test_exact_block_equals_its_fused_conv(case):
    cfg, k = case
    err64, err32 = check_exact_fusion(with_k(MobileOneBlock, k), cfg)
    assert err64 <= 1e-10  # relative, float64
    assert err32 <= 1e-5  # relative, float32


@settings(max_examples=250, deadline=None, derandomize=True)
@given(case=mobileone_configs())
def test_fast_composed_kernel_equals_the_sum_of_its_branches(case):
    cfg, k = case
    conv, _, x = conv_and_input(cfg)
    block = FastMobileOneBlock.from_conv(conv, init="scratch", k=k)
    randomize_scales(block)
    weight, bias = block.equivalent_kernel()
    with torch.no_grad():
        got = conv_as(block, x, weight, bias)
        assert relative_error(got, block(x)) <= 1e-12  # relative: forward runs that very conv
        assert relative_error(got, block.fuse()(x)) <= 1e-12  # relative: fuse() holds that kernel
        want = _fast_branches(block, x)
    assert relative_error(want, got) <= 1e-10  # relative, float64


def _fast_branches(block: FastMobileOneBlock, x: torch.Tensor) -> torch.Tensor:
    """The fast block's branches run one by one on the padded input: k KxK convs, the 1x1 conv and the identity
    on the centre tap."""
    xp = padded(block, x)
    (kh, kw), (dh, dw), (sh, sw) = block.kernel_size, block.dilation, block.stride
    out = 0
    weights = [(block.weight, block.scale_square)]
    if block.weight_extra is not None:
        weights += list(zip(block.weight_extra, block.scale_extra))
    for weight, scale in weights:
        out = out + _scaled_out(F.conv2d(xp, weight, None, block.stride, 0, block.dilation, block.groups), scale)
    if block.bias is not None:
        out = out + block.bias.reshape(1, -1, 1, 1)
    h, w = out.shape[-2:]
    centre = xp[..., dh * (kh // 2) :: sh, dw * (kw // 2) :: sw][..., :h, :w]
    if block.weight_1x1 is not None:
        out = out + _scaled_out(F.conv2d(centre, block.weight_1x1, groups=block.groups), block.scale_1x1)
    if block.scale_identity is not None:
        out = out + _scaled_out(centre, block.scale_identity)
    return out


def _scaled_out(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return y * scale.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [MobileOneBlock, FastMobileOneBlock])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=mobileone_configs())
def test_preserve_init_computes_what_the_conv_and_bn_did(cls, case):
    cfg, k = case
    assert check_preserve(with_k(cls, k), cfg) <= 1e-6  # relative, float64


@pytest.mark.parametrize(
    "conv, branches",
    [
        (nn.Conv2d(4, 4, 1), {"square", "square_1", "square_2", "square_3", "identity"}),
        (nn.Conv2d(4, 8, 1), {"square", "square_1", "square_2", "square_3"}),
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), {"square", "square_1", "square_2", "square_3", "pointwise",
                                                    "identity"}),
        (nn.Conv2d(4, 4, 3, stride=2, groups=2), {"square", "square_1", "square_2", "square_3", "pointwise"}),
    ],
)  # fmt: skip
def test_branches_follow_the_conv(conv, branches):
    assert set(MobileOneBlock.from_conv(conv).branches) == branches
    fast = FastMobileOneBlock.from_conv(conv)
    assert fast.weight_extra.shape[0] == 3 and (fast.weight_1x1 is None) == (conv.kernel_size == (1, 1))
    assert (fast.scale_identity is None) == ("identity" not in branches)


def test_k_sets_the_number_of_kxk_branches_and_is_checked():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert [n for n in MobileOneBlock.from_conv(conv, k=1).branches if n.startswith("square")] == ["square"]
    assert FastMobileOneBlock.from_conv(conv, k=1).weight_extra is None
    assert MobileOneBlock.describe(conv, k=2) == "3x3 x2 + 1x1 + identity"
    for bad in (0, 2.0, "2", True):
        with pytest.raises(ACNetError, match=r"^block_options: k=.* for block kind 'mobileone' must be an integer >= 1"):
            MobileOneBlock.from_conv(conv, k=bad)
    with pytest.raises(ACNetError, match="has no option 'j' .its options are k."):
        MobileOneBlock.from_conv(conv, j=2)


def test_scratch_init_sets_every_gamma_and_new_kernels_differ():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    block = MobileOneBlock.from_conv(conv, bn, init="scratch", gamma_init=0.25, k=2)
    assert block.branches["square"].bn is bn and block.branches["square"].conv is conv
    for name, branch in block.branches.items():
        assert torch.equal(branch.bn.weight, torch.full((4,), 0.25)), name
    assert not torch.equal(block.branches["square_1"].conv.weight, conv.weight)
    fast = FastMobileOneBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1), init="scratch", gamma_init=0.25, k=3)
    assert torch.equal(fast.scale_extra, torch.full((2, 4), 0.25)) and torch.equal(fast.scale_square, torch.ones(4))


@pytest.mark.parametrize("cls", [MobileOneBlock, FastMobileOneBlock])
@pytest.mark.parametrize("kernel", [1, 3])
def test_gradients_reach_every_branch(cls, kernel):
    conv = nn.Conv2d(4, 4, kernel, padding=kernel // 2, groups=2, bias=True, dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    assert_gradients_reach_every_kernel_and_scale(block, torch.randn(2, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "conv, reason",
    [(nn.Conv2d(4, 4, (3, 2)), "even"), (nn.Conv3d(4, 4, 3), "Conv3d"),
     (type("MyConv", (nn.Conv2d,), {"forward": lambda self, x: 2 * nn.Conv2d.forward(self, x)})(4, 4, 1),
      "MyConv overrides forward")],
)  # fmt: skip
def test_conv_problem_names_the_reason(conv, reason):
    for cls in (MobileOneBlock, FastMobileOneBlock):
        assert reason in cls.conv_problem(conv)
        with pytest.raises(ACNetError, match="another block kind"):
            cls.from_conv(conv)


@pytest.mark.parametrize("cls", [MobileOneBlock, FastMobileOneBlock])
def test_symbolic_tracing_records_the_same_function(cls):
    conv = nn.Conv2d(4, 4, (3, 5), padding=(1, 3), padding_mode="reflect", dtype=torch.float64)
    block = cls.from_conv(conv, nn.BatchNorm2d(4, dtype=torch.float64) if cls.absorbs_bn else None, init="scratch")
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(block(x), torch.fx.symbolic_trace(block)(x)) <= 1e-12  # relative, float64


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16),
    ).double()  # fmt: skip


def test_the_default_min_kernel_leaves_1x1_convs_to_the_kind():
    acb = acify(small_net()).acnet_plan
    assert [s.code for s in acb.skipped] == ["block-unsupported"] and acb.skipped[0].kernel == (1, 1)
    plan = acify(small_net(), block="mobileone").acnet_plan
    assert [s.kernel for s in plan.converted] == [(3, 3), (3, 3), (1, 1)] and not plan.skipped
    assert not acify(small_net(), block="mobileone", min_kernel=5).acnet_plan.converted[:-1]  # only the 1x1 left


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_k_is_recorded_in_the_plan_and_checkpoint_and_load_builds_it(tmp_path, mode):
    acified = acify(small_net(), block={"0": "acb", "*": "mobileone"}, mode=mode, init="scratch",
                    block_options={"mobileone": {"k": 2}})  # fmt: skip
    assert [s.options for s in acified.acnet_plan.converted] == [{}, {"k": 2}, {"k": 2}]
    assert acified.acnet_plan.converted[1].branches.startswith("3x3 x2")
    randomize_bn(acified)
    path = save_weights(acified, tmp_path / "run.safetensors")
    loaded = load(small_net(), path)
    assert [s.options for s in loaded.acnet_plan.converted] == [{}, {"k": 2}, {"k": 2}]
    blocks = [m for m in loaded.modules() if isinstance(m, (MobileOneBlock, FastMobileOneBlock))]
    assert len(blocks) == 2 and all(b.options == {"k": 2} for b in blocks)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    acified.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(acified(x), loaded(x))
        assert relative_error(acified(x), deploy(loaded)(x)) <= 1e-10  # relative, float64
    default = acify(small_net(), block="mobileone").acnet_plan.converted[0]
    assert default.options == {"k": MobileOneBlock.kind_options["k"].default}


def test_block_options_for_a_kind_not_chosen_or_not_a_mapping_are_refused():
    with pytest.raises(ACNetError, match="block kind 'mobileone' is not one that block chooses"):
        acify(small_net(), block="dbb", block_options={"mobileone": {"k": 2}})
    with pytest.raises(ACNetError, match="block_options must map a block kind to its options"):
        acify(small_net(), block="mobileone", block_options={"k": 2})
    with pytest.raises(ACNetError, match="block kind 'repvgg' has no option 'k' .it takes none."):
        acify(small_net(), block="repvgg", block_options={"repvgg": {"k": 2}})


def test_cli_takes_block_option_and_names_the_flag_in_errors(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\n\ndef net():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), "
                                     "nn.BatchNorm2d(8))\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    base = ["inspect", "net.py:net", "--input-shape", "1,3,8,8", "--block", "mobileone"]
    result = runner.invoke(app, [*base, "--block-option", "mobileone.k=3", "--json"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)["sites"]
    assert [s["options"] for s in sites] == [{"k": 3}, {"k": 3}] and sites[1]["branches"] == "1x1 x3 + identity"
    for bad, message in (("mobileone.k=0", "--block-option: k=0 for block kind 'mobileone' must be an integer"),
                         ("k=3", "--block-option 'k=3': write KIND.NAME=VALUE"),
                         ("dbb.k=3", "--block-option: block kind 'dbb' is not one that --block chooses")):
        result = runner.invoke(app, [*base, "--block-option", bad])
        assert result.exit_code == 2 and message in result.output, result.output
