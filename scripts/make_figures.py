"""Draw the documentation figures: docs/img/acblock.png (the block during training and its fusion into one kernel).

Usage: python scripts/make_figures.py [--out docs/img]
The kernels shown are computed by acnet_convert from a real ACBlock with trained-looking BatchNorm statistics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from acnet_convert import ACBlock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BRANCH_COLOURS = {"square": "#4c72b0", "hor": "#dd8452", "ver": "#55a868"}


def example_block() -> ACBlock:
    """A 3x3 block whose BatchNorms have random affine parameters and running statistics."""
    torch.manual_seed(4)
    block = ACBlock(1, 1, 3, padding=1)
    with torch.no_grad():
        for branch in block.branches.values():
            branch.bn.weight.uniform_(0.6, 1.4)
            branch.bn.bias.uniform_(-0.2, 0.2)
            branch.bn.running_mean.uniform_(-0.1, 0.1)
            branch.bn.running_var.uniform_(0.5, 1.5)
    return block.eval()


def branch_kernels(block: ACBlock) -> dict[str, torch.Tensor]:
    """Each branch's BN-folded kernel placed on the 3x3 grid (NaN where the branch has no weight), and the sum."""
    grids = {}
    for name, branch in block.branches.items():
        with torch.no_grad():
            weight, _ = branch.kernel(torch.float64)
        grid = torch.full((3, 3), float("nan"), dtype=torch.float64)
        rows = slice(None) if weight.shape[2] == 3 else slice(1, 2)
        cols = slice(None) if weight.shape[3] == 3 else slice(1, 2)
        grid[rows, cols] = weight[0, 0]
        grids[name] = grid
    grids["fused"] = block.fused_kernel()[0][0, 0]
    return grids


def box(ax: Axes, x: float, y: float, text: str, colour: str, width: float = 1.6) -> None:
    """A rounded box centred on (x, y)."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.28), width, 0.56, boxstyle="round,pad=0.05",
                                facecolor=colour, edgecolor="none", alpha=0.9))  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", color="white", fontsize=10, fontweight="bold")


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A thin arrow from start to end."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#444444", lw=1.2))


def draw_block(ax: Axes) -> None:
    """The training-time block: three conv+BN branches summed, and the single conv it deploys to."""
    ax.set(xlim=(0, 10), ylim=(-0.2, 3.7), title="training: an Asymmetric Convolution Block")
    ax.axis("off")
    ax.text(0.4, 2, "x", fontsize=14, ha="center", va="center")
    labels = {"square": "3x3 conv", "hor": "1x3 conv", "ver": "3x1 conv"}
    for (name, label), y in zip(labels.items(), (3.2, 2.0, 0.8)):
        arrow(ax, (0.6, 2), (1.9, y))
        box(ax, 2.8, y, label, BRANCH_COLOURS[name])
        arrow(ax, (3.7, y), (4.3, y))
        box(ax, 5.0, y, "BN", BRANCH_COLOURS[name], width=1.1)
        arrow(ax, (5.6, y), (6.75, 2))
    ax.text(7.0, 2, "+", fontsize=20, ha="center", va="center")
    arrow(ax, (7.3, 2), (8.1, 2))
    ax.text(8.4, 2, "y", fontsize=14, ha="center", va="center")
    ax.text(5.0, -0.1, "deploy: one 3x3 conv with bias computes the same y", ha="center", fontsize=10,
            style="italic")  # fmt: skip


def draw_kernels(fig: matplotlib.figure.SubFigure, grids: dict[str, torch.Tensor]) -> None:
    """The BN-folded branch kernels and their sum, on a shared colour scale."""
    limit = max(g.nan_to_num(0).abs().max().item() for g in grids.values())
    titles = {"square": "3x3 branch", "hor": "1x3 branch", "ver": "3x1 branch", "fused": "deployed kernel"}
    axes = fig.subplots(1, 4)
    for ax, (name, grid), symbol in zip(axes, grids.items(), ("+", "+", "=", "")):
        image = ax.imshow(grid.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit)
        for i, j in grid.isnan().logical_not().nonzero().tolist():
            ax.text(j, i, f"{grid[i, j].item():.2f}", ha="center", va="center", fontsize=9)
        ax.set_title(titles[name], color=BRANCH_COLOURS.get(name, "black"), fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        if symbol:
            ax.text(3.05, 1, symbol, fontsize=18, ha="center", va="center")
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight (BatchNorm folded in)")


def make_acblock_figure(path: Path) -> Path:
    """Write the ACBlock figure to ``path``."""
    fig = plt.figure(figsize=(11, 6.4), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.1, 1))
    draw_block(top.subplots())
    bottom.suptitle(
        "fusion: fold each BN into its kernel and bias, add the 1x3 and 3x1 kernels onto the centre row and column "
        "(the biases add up too)"
    )
    draw_kernels(bottom, branch_kernels(example_block()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNG files")
    args = parser.parse_args()
    print(make_acblock_figure(Path(args.out) / "acblock.png"))


if __name__ == "__main__":
    main()
