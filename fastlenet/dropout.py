"""dropout: torch.nn.functional.dropout, bit for bit, with its noise drawn faster on the CPU.

Stock's dropout in training multiplies its input by noise = bernoulli(1 - p) / (1 - p), and on
the CPU draws that noise one element at a time through the generator's virtual call (~7 ns an
element: 4.2 ms for pytorch/examples' MNIST Net's first dropout at batch 64, more than the
net's convolutions' forward). csrc/dropout_cpu.cpp draws the same numbers from the same
default generator, vectorised, and leaves the generator where stock's leaves it; the product
is stock's mul, so outputs, gradients of every order and the autograd graph (MulBackward0)
are stock's, in any layout (the noise is empty_like(input), filled in memory order, as stock's).
Everywhere else -- evaluation, p of 0 or 1, another device or dtype, torch.compile, torch.func
-- it is stock's F.dropout itself.
"""

import torch
import torch.nn.functional as F

from fastlenet import _ext
from fastlenet._autograd import is_compiling, transforms_active

_DTYPES = (torch.float32, torch.float64)
_Tensor = torch.Tensor


def dropout(input, p=0.5, training=True, inplace=False):
    """torch.nn.functional.dropout(input, p, training, inplace), the same result bit for bit."""
    if (
        training
        and type(input) is _Tensor
        and type(p) in (float, int)
        and 0 < p < 1
        and _ext.LOADED
        and input.is_cpu
        and input.dtype in _DTYPES
        and input.numel() > 0
        and not is_compiling()
        and not transforms_active()
    ):
        noise = _ext._C.dropout_noise(input, float(p))
        return input.mul_(noise) if inplace else input * noise
    return F.dropout(input, p, training, inplace)
