"""Reference networks from the ACNet paper's CIFAR experiments, small enough to train on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 5) -> nn.Sequential:
    """A bias-free 'same' conv, BatchNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """The paper's Cifar-quick style network: three 5x5 conv-BN-ReLU stages with max pooling, then a linear layer."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width), nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(width, width), nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(width, 2 * width), nn.AdaptiveMaxPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class LargeKernelCNN(nn.Module):
    """SmallCNN with large depthwise kernels, ConvNeXt's way: a 3x3 stem, then three stages of a depthwise KxK
    conv-BN and a 1x1 conv-BN-ReLU with max pooling, then a linear layer."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, kernel: int = 7):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(in_channels, width, 3)]
        for cin, cout, pool in ((width, width, True), (width, width, True), (width, 2 * width, False)):
            layers += [nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False), nn.BatchNorm2d(cin),
                       conv_bn_relu(cin, cout, 1)]  # fmt: skip
            layers.append(nn.MaxPool2d(2, ceil_mode=True) if pool else nn.AdaptiveMaxPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class PadShortcut(nn.Module):
    """The CIFAR ResNets' parameter-free shortcut: subsample by the stride and zero-pad the new channels."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or padded) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout - cin, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2 (ResNet-56 for depth=56): three stages of 16, 32 and 64 channels."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, 16, kernel=3)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, stride=2 if stage and not index else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.layers(self.stem(x)).mean((2, 3)))
