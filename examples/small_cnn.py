"""The small CIFAR-quick style network used in the ACNet paper's CIFAR experiments."""

from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages with max pooling, then a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width), nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(width, width), nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(width, 2 * width), nn.AdaptiveMaxPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
