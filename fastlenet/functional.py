"""The fused ops as functions (the layers in fastlenet.nn call these)."""

from fastlenet.conv_relu_pool import conv_relu_pool2d
from fastlenet.dropout import dropout
from fastlenet.linear_relu import linear, linear_relu

__all__ = ["conv_relu_pool2d", "dropout", "linear", "linear_relu"]
