"""The recipe "add a built-in block kind", followed on a copy of the package: one new module, one line in a table."""

import subprocess
import sys

from testkit import changed_files, copy_package

# Step 1: the kind's module in acnet_convert/blocks/, built on the shared machinery.
KIND_MODULE = '''"""A KxK conv plus a 1x1 conv on its centre tap, each with a BatchNorm, summed."""

from torch import nn

from .branches import ConvBranch, new_bn, plain_conv_problem, pointwise_branch
from .forms import SummedBranches


class PointwiseBlock(SummedBranches):
    """KxK-BN + 1x1-BN, the 1x1 aligned on the kernel's centre tap."""

    kind = "pointwise"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return plain_conv_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return "x".join(map(str, conv.kernel_size)) + " + 1x1"

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        return {
            "square": ConvBranch(conv, bn if bn is not None else nn.Identity()),
            "pointwise": pointwise_branch(conv, new_bn(bn, conv.out_channels, **factory), **factory),
        }
'''

# Step 2: its line in constants.BUILTIN_KINDS.
KIND_LINE = '    "pointwise": {"exact": "pointwise:PointwiseBlock"},\n'

# What the copy must then do, run in a fresh interpreter that imports the copy.
CHECKS = '''
import sys
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
from typer.testing import CliRunner

import acnet_convert
from acnet_convert import acify, deploy
from acnet_convert.blocks import kinds
from acnet_convert.cli import app

assert acnet_convert.__file__.startswith(sys.argv[1]), acnet_convert.__file__
assert kinds()[-1] == "pointwise", kinds()

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8)).double()
x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
acified = acify(model, block="pointwise", init="scratch")
assert [type(m).__name__ for m in acified.modules()].count("PointwiseBlock") == 2
acified.train()
for _ in range(3):  # running statistics away from their defaults
    acified(torch.randn_like(x))
with torch.no_grad():
    for m in acified.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
acified.eval()
deployed = deploy(acified)
assert not any(type(m).__name__ == "PointwiseBlock" for m in deployed.modules())
with torch.no_grad():
    want, got = acified(x), deployed(x)
relative = (want - got).abs().max().item() / max(1.0, want.abs().max().item())
assert relative <= 1e-8, relative

help_text = CliRunner().invoke(app, ["convert", "--help"], terminal_width=200).output
assert "pointwise" in help_text, help_text
print("recipe ok")
'''


def test_a_built_in_kind_is_one_module_and_one_table_line(tmp_path):
    root = tmp_path / "source"
    copy = copy_package(root)

    (copy / "blocks" / "pointwise.py").write_text(KIND_MODULE)
    constants = copy / "constants.py"
    text = constants.read_text()
    table = text.index("BUILTIN_KINDS = {")
    end = text.index("\n}\n", table) + 1
    constants.write_text(text[:end] + KIND_LINE + text[end:])

    assert changed_files(copy) == ["blocks/pointwise.py", "constants.py"]
    run = subprocess.run([sys.executable, "-c", CHECKS, str(root)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout
    assert "recipe ok" in run.stdout
