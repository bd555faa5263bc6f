"""LeNet-5 and the Fashion-MNIST CNN of the PyTorch tutorials, fused or stock.

Both variants of a model have the same state_dict keys as the tutorial network, so a stock
checkpoint loads into the fused model (and back) with strict=True.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastlenet import nn as fnn


class LeNet5(nn.Module):
    """1x32x32 -> conv 6@5x5, ReLU, pool 2 -> conv 16@5x5, ReLU, pool 2 -> 400 -> 120 -> 84 ->
    num_classes."""

    input_size = (1, 32, 32)

    def __init__(self, num_classes=10, fused=True, backend="auto"):
        super().__init__()
        self.fused = fused
        if fused:
            self.conv1 = fnn.ConvReLUPool2d(1, 6, 5, backend=backend)
            self.conv2 = fnn.ConvReLUPool2d(6, 16, 5, backend=backend)
            self.fc1 = fnn.LinearReLU(16 * 5 * 5, 120, backend=backend)
            self.fc2 = fnn.LinearReLU(120, 84, backend=backend)
            self.fc3 = fnn.Linear(84, num_classes, backend=backend)
        else:
            self.conv1 = nn.Conv2d(1, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        if self.fused:
            x = self.conv2(self.conv1(x))
            return self.fc3(self.fc2(self.fc1(torch.flatten(x, 1))))
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class FashionCNN(nn.Module):
    """1x28x28 -> conv 16@5x5 pad 2, ReLU, pool 2 -> conv 32@5x5 pad 2, ReLU, pool 2 ->
    1568 -> num_classes."""

    input_size = (1, 28, 28)

    def __init__(self, num_classes=10, fused=True, backend="auto"):
        super().__init__()
        self.fused = fused
        if fused:
            self.conv1 = fnn.ConvReLUPool2d(1, 16, 5, padding=2, backend=backend)
            self.conv2 = fnn.ConvReLUPool2d(16, 32, 5, padding=2, backend=backend)
            self.fc = fnn.Linear(32 * 7 * 7, num_classes, backend=backend)
        else:
            self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
            self.fc = nn.Linear(32 * 7 * 7, num_classes)

    def forward(self, x):
        if self.fused:
            x = self.conv2(self.conv1(x))
        else:
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


MODELS = {"lenet5": LeNet5, "fashion-cnn": FashionCNN}
