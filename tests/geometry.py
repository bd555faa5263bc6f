"""The shapes every backend's tests share, by name, and the builders of their inputs.

CONV holds the conv2d -> ReLU -> max_pool2d geometries, LINEAR the linear shapes: one table
each for the C++ CPU, reference, CUDA and Triton tests and the CUDA simulator. A test that runs
some rows only names them; a backend that cannot afford every row runs a selection:
TRITON_CONV / TRITON_LINEAR for Triton, whose interpreter runs each program instance in Python
(each row takes well under a second there; natively the same rows run on the GPU), and SIM_CONV
for the CUDA simulator (tests/test_cuda_sim.py), which runs every CUDA thread as a std::thread.
"""

import torch

# (N, C, H, W, O, KH, KW, stride, padding, pool_size, pool_stride)
CONV = {
    "lenet_conv1": (4, 1, 32, 32, 6, 5, 5, 1, 0, 2, 2),  # LeNet-5 conv1
    # LeNet-5 conv1 on a smaller image: Triton splits its reduction in 2 (interpreter)
    "lenet_conv1_small": (2, 1, 16, 16, 6, 5, 5, 1, 0, 2, 2),
    # padding; 6 channels = 4 + 2 (the CUDA kernels' blocks of 4 output channels)
    "lenet_conv1_padded": (2, 1, 12, 12, 6, 5, 5, 1, 2, 2, 2),
    # LeNet-5 conv2: K = 150 (3 Triton K blocks), 75 rows, 4 full CUDA channel blocks
    "lenet_conv2": (3, 6, 14, 14, 16, 5, 5, 1, 0, 2, 2),
    "fashion_conv2": (2, 16, 28, 28, 32, 5, 5, 1, 2, 2, 2),  # Fashion-MNIST CNN conv2 (padding)
    "odd": (2, 3, 11, 9, 20, 3, 2, (2, 1), (1, 0), 3, 2),  # odd sizes, overlapping pools
    # the same with 5 = 4 + 1 channels: small integer data hold windows with max <= 0 too
    "odd_small": (3, 3, 11, 9, 5, 3, 2, (2, 1), (1, 0), 3, 2),
    "no_pool": (1, 2, 7, 8, 5, 3, 3, 1, 1, 1, 1),  # pool_size=1: conv + ReLU alone
    "strides": (3, 2, 13, 10, 9, 4, 3, 2, 2, (2, 3), (3, 1)),  # strides everywhere
    "pool_gaps": (2, 2, 10, 11, 4, 3, 3, 1, 0, 2, 3),  # pool_stride > pool_size: gaps
    "channels_70": (1, 2, 6, 6, 70, 3, 3, 1, 1, 2, 2),  # 70 channels: two Triton channel blocks
    # 64 channels of 7x7: several staged channel chunks in the CUDA forward
    "channels_64_7x7": (2, 64, 20, 20, 8, 7, 7, 1, 3, 2, 2),
    "tiles": (1, 2, 21, 20, 2, 3, 3, 1, 0, 2, 2),  # 9 x 9 pooled: 2 x 2 CUDA tiles, partial
    "slices": (3, 1, 40, 40, 2, 3, 3, 1, 0, 1, 1),  # 4332 pooled positions: 5 CUDA bwd slices
    "conv_1x1": (2, 1, 5, 5, 3, 5, 5, 1, 0, 1, 1),  # 1x1 conv output
    # small enough for a float64 gradcheck of the full Jacobian in Triton's interpreter
    "tiny": (1, 1, 6, 5, 2, 2, 2, 1, 1, 2, (2, 1)),
    "empty_batch": (0, 3, 8, 8, 4, 3, 3, 1, 0, 2, 2),
}

#: The rows Triton runs (see the module docstring).
TRITON_CONV = [
    "lenet_conv1_small",
    "lenet_conv2",
    "odd",
    "no_pool",
    "strides",
    "pool_gaps",
    "channels_70",
    "conv_1x1",
    "empty_batch",
]
#: The rows the CUDA simulator runs: no empty batch (tests/test_cuda_sim.py has its own case).
SIM_CONV = [
    "lenet_conv1_padded",
    "lenet_conv2",
    "odd_small",
    "strides",
    "no_pool",
    "tiles",
    "slices",
]

# (rows, in_features, out_features)
LINEAR = {
    "lenet_fc1": (64, 400, 120),  # LeNet-5's three layers
    "lenet_fc2": (64, 120, 84),
    "lenet_fc3": (64, 84, 10),
    "one_row": (1, 7, 3),
    "odd": (13, 33, 65),  # odd sizes crossing both CUDA GEMM tiles
    "empty_batch": (0, 5, 4),
    "tile_64": (1500, 700, 650),  # a product large enough for the CUDA 64 x 64 tile
    "lenet_fc1_small": (8, 400, 120),  # LeNet-5 fc1: K = 400 is 7 K blocks under the interpreter
    "odd_small": (37, 50, 23),  # odd everywhere
    "row_blocks": (130, 7, 3),  # 130 rows: three Triton row blocks, several reduction splits
    "feature_blocks": (3, 84, 70),  # 70 features: two Triton feature blocks of 64
    "one": (1, 1, 1),
}

#: The shapes Triton runs (see the module docstring).
TRITON_LINEAR = [
    "lenet_fc1_small",
    "odd_small",
    "row_blocks",
    "feature_blocks",
    "one",
    "empty_batch",
]


def conv_rows(*names):
    """The geometries of CONV named, in that order."""
    return [CONV[name] for name in names]


def linear_rows(*names):
    """The shapes of LINEAR named, in that order."""
    return [LINEAR[name] for name in names]


def pairs(conv):
    """stride, padding, pool_size, pool_stride as pairs (what the registered ops take)."""
    return [(v, v) if isinstance(v, int) else tuple(v) for v in conv]


def conv_inputs(geometry, dtype, device="cpu", requires_grad=True):
    """Random input, weight and bias of `geometry`, and its stride, padding, pool_size and
    pool_stride as pairs."""
    n, c, h, w, o, kh, kw, *rest = geometry
    make = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    x = torch.randn(n, c, h, w, **make)
    weight = torch.randn(o, c, kh, kw, **make)
    bias = torch.randn(o, **make)
    return x, weight, bias, pairs(rest)


def linear_inputs(shape, dtype, device="cpu", requires_grad=True, bias=True):
    """Random input, weight and bias (None without `bias`) of shape (rows, in, out)."""
    m, k, n = shape
    make = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    x = torch.randn(m, k, **make)
    weight = torch.randn(n, k, **make)
    return x, weight, torch.randn(n, **make) if bias else None


def conv_op_args(geometry, dtype, device="cpu", fwd=None):
    """Arguments of the registered ops: input, weight, bias, the geometry as pairs, a random
    grad_out and the argmax `fwd` saves (the C++ op by default)."""
    x, weight, bias, geom = conv_inputs(geometry, dtype, device, requires_grad=False)
    fwd = fwd or torch.ops.fastlenet.conv_relu_pool_fwd
    out, argmax = fwd(x, weight, bias, *geom)
    return x, weight, bias, geom, torch.randn_like(out), argmax
