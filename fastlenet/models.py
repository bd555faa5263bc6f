"""LeNet-5 and the Fashion-MNIST CNN of the PyTorch tutorials, fused or stock; and
pytorch/examples' MNIST Net in stock layers only (what fastlenet.fuse is shown on).

Both variants of a model have the same state_dict keys as the tutorial network, so a stock
checkpoint loads into the fused model (and back) with strict=True.
"""

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from fastlenet import chain
from fastlenet import nn as fnn
from fastlenet.fuse import fuse


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
        if self.fused:  # one autograd node when it may (fastlenet/chain.py)
            # The layers from _modules: attribute access to a child goes through
            # nn.Module.__getattr__ (these five: 2.7 us, from the dict 0.08 us; ~1% of the
            # batch-1 training step). A missing child reads as None, which the chain declines,
            # so the layered path raises what stock raises.
            m = self._modules
            layers = (m.get("conv1"), m.get("conv2"), m.get("fc1"), m.get("fc2"), m.get("fc3"))
            return chain.run(layers, x, self._layered)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def _layered(self, x):
        x = self.conv2(self.conv1(x))
        return self.fc3(self.fc2(self.fc1(torch.flatten(x, 1))))


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
        if self.fused:  # one autograd node when it may (fastlenet/chain.py)
            m = self._modules  # as in LeNet5.forward
            return chain.run((m.get("conv1"), m.get("conv2"), m.get("fc")), x, self._layered)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))

    def _layered(self, x):
        return self.fc(torch.flatten(self.conv2(self.conv1(x)), 1))


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


class CifarTutorialNet(nn.Module):
    """The network of PyTorch's tutorial "Training a Classifier" (CIFAR-10), as written there:
    3x32x32 -> conv 6@5x5, ReLU, pool 2 -> conv 16@5x5, ReLU, pool 2 -> 400 -> 120, ReLU -> 84,
    ReLU -> num_classes, one MaxPool2d module called after both convolutions."""

    input_size = (3, 32, 32)

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


MODELS = {"lenet5": LeNet5, "fashion-cnn": FashionCNN}


#: What a user's model class takes when it has no `input_size` attribute: MNIST's images.
DEFAULT_INPUT_SIZE = (1, 28, 28)


def model_class(name: str) -> type:
    """The class of a built-in model (a key of MODELS) or of a user's model given as
    "module:Class" (imported from the Python path, which holds the working directory under
    `python -m`). Raises ValueError naming what is wrong."""
    if name in MODELS:
        return MODELS[name]
    module_name, sep, class_name = name.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"model must be one of {tuple(MODELS)} or module:Class, got {name!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name!r}: cannot import it ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model {name!r} is not an nn.Module class")
    return cls


def input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the model takes: its class's `input_size`, else DEFAULT_INPUT_SIZE."""
    return tuple(getattr(model_class(name), "input_size", DEFAULT_INPUT_SIZE))


def build(name: str, num_classes: int, fused: bool, backend: str) -> nn.Module:
    """A built-in model (fused or stock), or a user's model class instantiated (with
    num_classes when it takes that argument) and, when `fused`, passed through
    fastlenet.fuse: its own layers, fastlenet's kernels where they compute the same thing."""
    cls = model_class(name)
    if name in MODELS:
        return cls(num_classes=num_classes, fused=fused, backend=backend)
    takes = inspect.signature(cls).parameters
    model = cls(num_classes=num_classes) if "num_classes" in takes else cls()
    return fuse(model, backend=backend) if fused else model
