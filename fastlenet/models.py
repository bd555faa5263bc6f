"""LeNet-5 and the Fashion-MNIST CNN of the PyTorch tutorials, fused or stock; and
pytorch/examples' MNIST Net in stock layers only (what fastlenet.fuse is shown on).

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


class ExamplesNet(nn.Module):
    """pytorch/examples' MNIST Net, as written there (1x28x28 -> conv 32@3x3, ReLU -> conv
    64@3x3, ReLU, pool 2 -> dropout -> 9216 -> 128, ReLU -> dropout -> num_classes,
    log-softmax); `input_size` may be smaller (fc1 is sized for it)."""

    input_size = (1, 28, 28)

    def __init__(self, num_classes=10, input_size=(1, 28, 28)):
        super().__init__()
        side = (input_size[1] - 4) // 2
        self.conv1 = nn.Conv2d(input_size[0], 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


MODELS = {"lenet5": LeNet5, "fashion-cnn": FashionCNN}
