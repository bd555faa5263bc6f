"""Drop-in layers: parameters and state_dicts interchangeable with the stock layers."""

from fastlenet.nn.conv_relu_pool import ConvReLUPool2d
from fastlenet.nn.dropout import Dropout
from fastlenet.nn.linear_relu import Linear, LinearReLU
from fastlenet.nn.sequential import Chain, Sequential

__all__ = ["Chain", "ConvReLUPool2d", "Dropout", "Linear", "LinearReLU", "Sequential"]
