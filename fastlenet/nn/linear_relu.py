"""LinearReLU and Linear: drop-ins for nn.Linear (+ ReLU) on fastlenet's kernels."""

import math

import torch
from torch import nn

from fastlenet import _checks, backends
from fastlenet.linear_relu import linear, linear_relu

# torch.fx.symbolic_trace through the layers (fx keeps only torch.nn's layers whole) records
# the calls as nodes instead of running them on a Proxy, which their checks refuse.
torch.fx.wrap("linear")
torch.fx.wrap("linear_relu")


class _FusedLinear(nn.Module):
    """Parameters named, shaped and initialised as nn.Linear's (interchangeable state_dicts)."""

    relu: bool

    def __init__(
        self, in_features, out_features, bias=True, *, backend="auto", device=None, dtype=None
    ):
        super().__init__()
        # Zero features are a layer as nn.Linear's: an empty weight, out = bias (no input
        # features) or an empty output; the ops take them.
        in_features = _checks.size_int(in_features, "in_features", 0)
        out_features = _checks.size_int(out_features, "out_features", 0)
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backends.check_choice(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same calls, in the same order, as nn.Linear.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        fn = linear_relu if self.relu else linear
        return fn(input, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


class LinearReLU(_FusedLinear):
    """relu(nn.Linear(in_features, out_features, bias)(x))."""

    relu = True


class Linear(_FusedLinear):
    """nn.Linear(in_features, out_features, bias) on fastlenet's kernels."""

    relu = False
