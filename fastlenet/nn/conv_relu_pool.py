"""ConvReLUPool2d: a drop-in for nn.Conv2d followed by ReLU and max_pool2d."""

import math

import torch
from torch import nn

from fastlenet import _checks, backends
from fastlenet.conv_relu_pool import conv_relu_pool2d

# torch.fx.symbolic_trace through the layer (fx keeps only torch.nn's layers whole) records the
# call as a node instead of running it on a Proxy, which its checks refuse.
torch.fx.wrap("conv_relu_pool2d")


class ConvReLUPool2d(nn.Module):
    """max_pool2d(relu(conv2d(x))) with parameters named, shaped and initialised as nn.Conv2d's,
    so state_dicts are interchangeable with `nn.Conv2d(in_channels, out_channels, kernel_size,
    stride, padding, bias=bias)`."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        bias=True,
        pool_size=2,
        pool_stride=None,
        *,
        dilation=1,
        groups=1,
        padding_mode="zeros",
        backend="auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        # Accepted so that code written for nn.Conv2d reads the same; only stock's defaults are
        # the fused op (README: what is supported).
        if _checks.pair(dilation, "dilation") != (1, 1):
            raise ValueError(f"dilation must be 1 (the fused conv has none), got {dilation!r}")
        if groups != 1:
            raise ValueError(f"groups must be 1 (the fused conv is not grouped), got {groups!r}")
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode must be 'zeros' (the fused conv pads with zeros), "
                f"got {padding_mode!r}"
            )
        # nn.Conv2d's attributes that summaries and FLOP counters read, at the only values the
        # fused conv has.
        self.dilation, self.groups, self.padding_mode = (1, 1), 1, "zeros"
        self.transposed, self.output_padding = False, (0, 0)
        self.in_channels = _checks.size_int(in_channels, "in_channels")
        self.out_channels = _checks.size_int(out_channels, "out_channels")
        self.kernel_size = _checks.pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        self.stride = _checks.pair(stride, "stride")
        if isinstance(padding, str):  # kept as given, as nn.Conv2d does
            _checks.check_padding_string(padding, self.stride)
            self.padding = padding
        else:
            self.padding = _checks.pair(padding, "padding")
        self.pool_size = _checks.pair(pool_size, "pool_size")
        self.pool_stride = (
            self.pool_size if pool_stride is None else _checks.pair(pool_stride, "pool_stride")
        )
        numeric = (0, 0) if isinstance(padding, str) else self.padding
        _checks.check_geometry(self.stride, numeric, self.pool_size, self.pool_stride)
        self.backend = backends.check_choice(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same calls, in the same order, as nn.Conv2d.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        return conv_relu_pool2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.pool_size,
            self.pool_stride,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding!r}, bias={self.bias is not None}, "
            f"pool_size={self.pool_size}, pool_stride={self.pool_stride}, "
            f"backend={self.backend!r}"
        )
