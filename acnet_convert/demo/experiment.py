"""Data sets, a plain training loop and the evaluations shared by the demo, the accuracy study and the benchmarks."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..api import plan
from ..checks.ptq import engine_name, quantize_int8, quantized_engine
from ..checks.weights import quantize_symmetric
from ..errors import ACNetError
from ..modules import modes_kept, replace_module


@dataclass
class Split:
    """A classification data set held in memory as tensors: images (N, C, H, W) and integer labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return self.x_train.shape[1]


@dataclass
class Recipe:
    """How a model is trained: SGD with momentum and a cosine learning rate, optionally with flip-and-crop."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = False


@dataclass
class History:
    """Per-epoch mean training loss and test accuracy (percent), and the training time in seconds."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Split:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package), stratified split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ACNetError("the digits data set comes with scikit-learn: pip install scikit-learn") from error
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=data.target
    )
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return Split("digits", (x_train - mean) / std, labels[train_idx], (x_test - mean) / std, labels[test_idx], 10)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(data_dir: str | Path) -> Split:
    """CIFAR-10 from a local copy (``torchvision.datasets.CIFAR10`` layout); nothing is downloaded."""
    from torchvision.datasets import CIFAR10

    try:
        train, test = (CIFAR10(str(data_dir), train=flag, download=False) for flag in (True, False))
    except RuntimeError as error:
        raise ACNetError(
            f"no CIFAR-10 under {data_dir}: it needs the python version (cifar-10-batches-py), e.g. from "
            "torchvision.datasets.CIFAR10(PATH, download=True) on a machine with internet access"
        ) from error
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def tensors(dataset) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float().div(255)
        return (x - mean) / std, torch.tensor(dataset.targets, dtype=torch.long)

    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    return Split("cifar10", x_train, y_train, x_test, y_test, 10)


def flip_and_crop(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation: random horizontal flip, zero-pad by ``pad`` and crop back at random."""
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    top, left = (torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=x.device) for _ in range(2))
    rows = (top + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (left + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Class predictions of ``model`` in eval mode (every submodule's mode is restored afterwards)."""
    with modes_kept(model, training=False):
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in percent."""
    return (predict(model, x) == y).float().mean().item() * 100


def train(
    model: nn.Module,
    split: Split,
    recipe: Recipe,
    seed: int,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> History:
    """Train ``model`` on ``split`` with ``recipe``; the batch order (and augmentation) depends only on ``seed``.

    ``on_epoch(epoch, mean_loss, test_accuracy)`` is called after every epoch.
    """
    device = next(model.parameters()).device
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_test, y_test = split.x_test.to(device), split.y_test.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs * steps_per_epoch)
    history = History()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator, device=device)
        total = 0.0
        for i in range(0, len(order), recipe.batch_size):
            batch = order[i : i + recipe.batch_size]
            x = flip_and_crop(x_train[batch], generator) if recipe.augment else x_train[batch]
            loss = nn.functional.cross_entropy(model(x), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        history.loss.append(total / len(x_train))
        history.accuracy.append(accuracy(model, x_test, y_test))
        if on_epoch is not None:
            on_epoch(epoch, history.loss[-1], history.accuracy[-1])
    history.seconds = time.perf_counter() - start
    return history


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread (tiny convs gain nothing from more, and lose a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


TEST_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "flip_lr": lambda x: x.flip(-1),
    "flip_ud": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
}


def transformed_accuracy(model: nn.Module, split: Split) -> dict[str, float]:
    """Top-1 accuracy (percent) on the test images flipped left-right, flipped up-down and rotated by 90 degrees."""
    device = next(model.parameters()).device
    x, y = split.x_test.to(device), split.y_test.to(device)
    return {name: accuracy(model, transform(x), y) for name, transform in TEST_TRANSFORMS.items()}


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv + BatchNorm pair the data flow proves folded into the conv."""
    model = copy.deepcopy(model).eval()
    for site in plan(model, block="mobileone", min_kernel=1).sites:  # the kind that takes 1x1 convs too
        if site.bn:
            conv, bn = model.get_submodule(site.name), model.get_submodule(site.bn)
            replace_module(model, site.name, fuse_conv_bn_eval(conv, bn))
            replace_module(model, site.bn, nn.Identity())
    return model


def quantize_weights(model: nn.Module, bits: int, per_channel: bool) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights are rounded to ``bits`` bits, symmetric max-abs scales.

    The scale is ``max|w| / (2**(bits-1) - 1)`` over the whole weight or over each output channel; biases and
    activations stay in float (weight-only fake quantisation).
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = module.weight
                peak = w.abs().amax(tuple(range(1, w.dim())), keepdim=True) if per_channel else w.abs().max()
                w.copy_(quantize_symmetric(w, peak, bits))
    return model


def int8_ptq_accuracy(model: nn.Module, calibration: Tensor, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy (percent) on ``(x, y)`` of a static INT8 copy of ``model`` calibrated on ``calibration``.

    The copy is made on the CPU by the flow of ``acnet_convert.checks.ptq`` (torch.ao FX, the engine's default
    qconfig mapping: per-channel INT8 weights, INT8 activations); its upstream warnings are not shown.
    """
    engine = engine_name()
    with warnings.catch_warnings(), quantized_engine(engine), torch.no_grad():
        warnings.simplefilter("ignore")
        quantized = quantize_int8(copy.deepcopy(model).cpu().eval(), (calibration.cpu(),), engine)
        return accuracy(quantized, x.cpu(), y.cpu())
