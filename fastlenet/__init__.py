"""fastlenet: fused conv+ReLU+max-pool and linear+ReLU kernels for training small CNNs.

import fastlenet
model = fastlenet.fuse(model)                       # an existing stock model, fused
layer = fastlenet.ConvReLUPool2d(1, 6, 5)          # drop-in for nn.Conv2d + ReLU + pool
y = fastlenet.functional.conv_relu_pool2d(x, w, b)  # the same op as a function
fastlenet.available_backends()                      # which kernels run here, and why not
"""

from fastlenet import functional, nn
from fastlenet._checks import ArgumentError, ArgumentTypeError
from fastlenet.backends import available_backends
from fastlenet.fuse import fuse
from fastlenet.memory import cached_buffers, release_cached_buffers
from fastlenet.models import FashionCNN, LeNet5
from fastlenet.nn import ConvReLUPool2d, Linear, LinearReLU

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ConvReLUPool2d",
    "FashionCNN",
    "LeNet5",
    "Linear",
    "LinearReLU",
    "available_backends",
    "cached_buffers",
    "functional",
    "fuse",
    "nn",
    "release_cached_buffers",
]
