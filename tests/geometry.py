"""The shapes and backends every backend's tests share, by name, and the builders of inputs.

CONV holds the conv2d -> ReLU -> max_pool2d geometries, LINEAR the linear shapes: one table
each for the C++ CPU, reference, CUDA and Triton tests and the CUDA simulator. A test that runs
some rows only names them; a backend that cannot afford every row runs a selection:
TRITON_CONV / TRITON_LINEAR for Triton, whose interpreter runs each program instance in Python
(each row takes well under a second there; natively the same rows run on the GPU), and SIM_CONV
for the CUDA simulator (tests/test_cuda_sim.py), which runs every CUDA thread as a std::thread.

A test of a property every backend has is parametrized over the backends with conv_cases,
linear_cases or backend_cases: one row per backend that runs here, with the device of its
tensors (device()); the rows on CUDA tensors carry the `gpu` mark, so `pytest -m gpu` runs them
on a GPU and they are deselected elsewhere (tests/conftest.py).
"""

import itertools

import pytest
import torch
from conftest import CPU_BACKENDS

from fastlenet import backends

F32, F64 = torch.float32, torch.float64
HALF = [torch.float16, torch.bfloat16]
#: Relative error allowed against the float64 reference on the same (rounded) inputs: float64
#: rounding; float32 sums of up to a few thousand terms; float16/bfloat16 accumulate in float32
#: and round the result (2^-11, 2^-8).
TOL = {F64: 1e-12, F32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

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
    # pool_size=1: conv + ReLU alone (the C++ CPU op: flat_forward below, no_pool_deep's 16
    # input channels too; ATen's dense backward; tap_gemm_no_pool below: the tap GEMM)
    "no_pool": (1, 2, 7, 8, 5, 3, 3, 1, 1, 1, 1),
    "no_pool_deep": (2, 16, 7, 6, 5, 3, 3, 1, 1, 1, 1),  # patches of depth 16 * 3 * 3 = 144
    # pool_size=1, the CPU backward's float32 gradients: from oneDNN's backward of channels-last
    # copies (csrc/conv_relu_pool_cpu_nopool_cl.h, cl_backward_suits) for channel counts that are
    # not multiples of 16 (no_pool_deep, no_pool_strided, tap_gemm_no_pool; here 17 = 16 + 1 and
    # 19 = 16 + 3 channels over planes of 90 = 5 x 16 + 10 outputs) or planes of at most 64
    # outputs; from ATen's NCHW backward otherwise (no_pool_nchw, no_pool_dnn_deep).
    "no_pool_cl": (2, 17, 9, 10, 19, 3, 3, 1, 1, 1, 1),
    "no_pool_cl_planes": (2, 32, 8, 8, 16, 3, 3, 1, 1, 1, 1),
    "no_pool_nchw": (2, 16, 9, 10, 32, 3, 3, 1, 1, 1, 1),
    # pool_size=1, the CPU forward's choice between flat_forward and ATen's convolution
    # (flat_suits): channel counts on oneDNN's blocks of 16 take ATen's with at most 64 conv
    # outputs a plane (no_pool_cl_planes: 8x8; the ReLU/argmax pass of no_pool_strided below
    # after it) or a patch of depth 288 or more over fewer than 900 (no_pool_dnn_deep: 16 * 5 * 5
    # over 90; no_pool_cl_planes: 32 * 3 * 3), flat_forward otherwise (no_pool_nchw: depth 144
    # over 90 outputs; no_pool_dnn_large: depth 400 over 30x30); other channel counts take
    # flat_forward up to 128 input channels (flat_wide: 37 -> 22, 5x5 with padding, output
    # channels in blocks of 8, the last one of 6); flat_wide_10, flat_wide_12 and flat_wide_14:
    # samples of 32 KiB and more, 10 outputs in one block of 10, 11 in one of 12, 14 in one of
    # 14 (kFlatWideBlocks).
    "no_pool_dnn_deep": (2, 16, 10, 9, 16, 5, 5, 1, 2, 1, 1),
    "no_pool_dnn_large": (1, 16, 30, 30, 16, 5, 5, 1, 2, 1, 1),
    # the same over 32x32 planes (4 KB of float32): the weight gradient from oneDNN's
    # channels-last backward (cl_weight_suits), the input gradient flat_grad_input's
    "no_pool_dnn_4k": (1, 16, 32, 32, 16, 3, 3, 1, 1, 1, 1),
    "flat_wide": (2, 37, 9, 10, 22, 5, 5, 1, 2, 1, 1),
    "flat_wide_10": (2, 32, 14, 14, 10, 3, 3, 1, 1, 1, 1),
    "flat_wide_12": (2, 40, 14, 13, 11, 3, 3, 1, 1, 1, 1),
    "flat_wide_14": (2, 32, 14, 14, 14, 3, 3, 1, 1, 1, 1),
    # pool_size=1, few input channels: the CPU backward's own weight gradient
    # (csrc/conv_relu_pool_cpu_nopool.h): conv rows of 33 = 16 + 16 + 1 lanes, 7 output channels
    # (blocks of 2 and one of 1); 5x5 with padding, 18 = 16 + 2 lanes.
    "no_pool_wide": (2, 1, 19, 35, 7, 3, 3, 1, 0, 1, 1),
    "no_pool_5x5": (2, 1, 13, 18, 5, 5, 5, 1, 2, 1, 1),
    # pool_size=1, few input channels and at most 25 taps: the CPU forward's flat_forward
    # (no_pool, no_pool_wide, no_pool_5x5, slices and conv_1x1 too; flat_wide above for wide
    # layers; csrc/conv_relu_pool_cpu_nopool_fwd.h). Their input gradient (at most 8 input
    # channels, padding below the kernel, a padded plane at most twice the conv outputs) is the
    # flat kernel's transposed conv (csrc/conv_relu_pool_cpu_nopool_gi.h): no_pool, flat_rows
    # (beside oneDNN's channels-last weight gradient), flat_blocks, no_pool_wide, no_pool_5x5,
    # slices; and of channel counts on oneDNN's blocks over planes of 30x30 and more
    # (no_pool_dnn_large); conv_1x1 (a 5x5 plane for one conv output), no_pool_strided and the
    # other layers of more channels take ATen's.
    # Vectors per conv row (16 wide conv rows of 20 padded), 12 outputs in blocks of 6, 15 vectors
    # in blocks of 4 and a last one of 3 (float32; float64 30, 7 blocks and one of 2); flattened
    # rows, 29 outputs in blocks of 6 (the last with 5), a block of 4 vectors and one of 1; 10
    # outputs in two blocks of 5 and an input gradient of 7 channels in a block of 7.
    "flat_rows": (2, 3, 15, 16, 12, 5, 5, 1, 2, 1, 1),
    "flat_blocks": (2, 1, 9, 10, 29, 3, 3, 1, 0, 1, 1),
    "flat_blocks_5_7": (2, 7, 12, 13, 10, 3, 3, 1, 1, 1, 1),
    # pool_size=1 with a conv stride: 2 * 7 * 6 * 5 outputs, 26 vectors and a tail of 4
    "no_pool_strided": (2, 3, 11, 10, 7, 3, 3, 2, 1, 1, 1),
    "strides": (3, 2, 13, 10, 9, 4, 3, 2, 2, (2, 3), (3, 1)),  # strides everywhere
    "pool_gaps": (2, 2, 10, 11, 4, 3, 3, 1, 0, 2, 3),  # pool_stride > pool_size: gaps
    "channels_70": (1, 2, 6, 6, 70, 3, 3, 1, 1, 2, 2),  # 70 channels: two Triton channel blocks
    # 64 channels of 7x7: several staged channel chunks in the CUDA forward
    "channels_64_7x7": (2, 64, 20, 20, 8, 7, 7, 1, 3, 2, 2),
    "tiles": (1, 2, 21, 20, 2, 3, 3, 1, 0, 2, 2),  # 9 x 9 pooled: 2 x 2 CUDA tiles, partial
    "slices": (3, 1, 40, 40, 2, 3, 3, 1, 0, 1, 1),  # 4332 pooled positions: 68 CUDA bwd slices
    "conv_1x1": (2, 1, 5, 5, 3, 5, 5, 1, 0, 1, 1),  # 1x1 conv output
    # small enough for a float64 gradcheck of the full Jacobian in Triton's interpreter
    "tiny": (1, 1, 6, 5, 2, 2, 2, 1, 1, 2, (2, 1)),
    "empty_batch": (0, 3, 8, 8, 4, 3, 3, 1, 0, 2, 2),
    # Patch rows too long for the CPU backward's registers (its wide kernels): 5x5 with 16 -> 32
    # channels, patch rows of 80 values split in tiles; odd channel counts with pool 3 stride 2;
    # few output channels (grad_x by output channel, grad_w wide); 64 -> 128 channels (grad_w
    # rows in several column tiles, grad_x tiles of 4 vectors); a kernel of 9 rows (tiles of
    # fewer rows at the bottom).
    "wide_5x5": (2, 16, 10, 10, 32, 5, 5, 1, 2, 2, 2),
    "wide_odd_pool3": (2, 37, 9, 11, 22, 3, 3, 1, 1, 3, 2),
    "wide_few_out": (2, 20, 8, 8, 10, 5, 5, 1, 0, 3, 2),
    "wide_deep": (2, 64, 6, 6, 128, 3, 3, 1, 1, 2, 2),
    "tall_kernel": (2, 2, 13, 6, 18, 9, 2, 1, 0, 2, 2),
    # A sample whose rows are more than one band of the wide grad_w's windows (60 KiB in
    # float32, over kWideOneBandBytes; kWideBandBytes: 15 pooled rows in bands of 8 in float32,
    # of 4 in float64, the last one shorter). The wide rows above are one band each.
    "wide_bands": (1, 16, 33, 32, 8, 3, 3, 1, 0, 2, 2),
    # One channel, 3x3, 36 pooling windows a plane: grad_w's sample copy and its twin (rows of
    # one vector in float32 and float64); odd output count.
    "twin_3x3": (2, 1, 13, 12, 5, 3, 3, 1, 1, 2, 2),
    # 15 channels: grad_w's sample copy with pixels padded to a 64-byte vector (weight_pixel),
    # one padding lane, on the wide kernels (so are wide_odd_pool3's 37 -> 48 and wide_few_out's
    # 20 -> 32); "odd" (3 channels to 4) is the register-blocked kernel's padded case.
    "wide_padded_pixels": (2, 15, 9, 10, 20, 3, 3, 1, 1, 2, 2),
    # grad_x by pooling-window region (csrc/conv_relu_pool_cpu_bwd_tile.h; most rows above with
    # at most 8 channels take it too): a 7x5 kernel with pool 3 stride 2, regions of 9 rows by
    # 7 pixels of 8 channels in two column groups, a list per row shift (three), its 12 output
    # channels in one pass (float32).
    "region_groups": (2, 8, 13, 12, 12, 7, 5, 1, 1, 3, 2),
    # The region kernel with a list per row shift (split_shifts; region_groups and lenet_conv2
    # too, float32): 45 output channels in passes of 21, 21 and 3.
    "region_lists": (2, 6, 14, 14, 45, 5, 5, 1, 0, 2, 2),
    # The CPU forward by lanes over output channels (forward_channels) keeps the conv rows of a
    # pooled row in a ring: pooled rows 1 apart share 2 of their 3 conv rows, computed once.
    "channels_pool_overlap": (2, 6, 12, 11, 24, 3, 3, 1, 1, (3, 2), (1, 2)),
    # Output channels past whole pairs of vectors: forward_channels in blocks of two vectors,
    # then a block of one (45 = 32 + 13; channels_70's 6 past 64 take one narrow vector).
    "channels_pair_rest": (2, 5, 9, 10, 45, 3, 3, 1, 1, 2, 2),
    # 7 channels, 5x5 (float32): grad_w's 8-float pixels on the wide kernels, from the copy or
    # its twin half a line along (aligned_wide_weight; lenet_conv2 too), with padding and
    # pool 3 stride 2.
    "half_line_pixels": (2, 7, 11, 12, 9, 5, 5, 1, 2, 3, 2),
    # grad_w from packed patch rows (PackedRows in csrc/conv_relu_pool_cpu_bwd_wide.h; float32,
    # lenet_conv2 too): 10 channels, 5x5 with padding and pool 3 stride 2 (rows of 50 values,
    # 4 vectors instead of 5); 6 channels with a conv stride of 2 (30 values, 2 instead of 3);
    # 20 channels, 5x5, few output channels (100 values, 7 instead of 10).
    "packed_rows": (2, 10, 9, 10, 9, 5, 5, 1, 1, 3, 2),
    "packed_rows_strided": (2, 6, 13, 12, 5, 5, 5, 2, 2, 2, 2),
    "packed_rows_wide": (2, 20, 8, 8, 10, 5, 5, 1, 0, 2, 2),
    # One input channel: the CPU forward's lanes over pooled columns at least half full
    # (kColumnsOneChannelFill) however many outputs: the Fashion CNN's conv1 (16 outputs in
    # blocks of 6, 6 and 4), and 8 pooled columns of 16 lanes, 13 outputs (6, 6, 1), odd width.
    # Both, and lenet_conv1, have 2x2 pools at stride 2 over 5 or 3 taps a row: the paired
    # column kernel (columns_block_pairs).
    "columns_one_channel": (3, 1, 28, 28, 16, 5, 5, 1, 2, 2, 2),
    "columns_one_channel_3x3": (2, 1, 16, 17, 13, 3, 3, 1, 1, 2, 2),
    # One input channel, float32, at least 128 windows a batch: grad_w from rows stacked by column
    # (csrc/conv_relu_pool_cpu_bwd_stacks.h; lenet_conv1 and columns_one_channel too). 5x5 with
    # padding 2, 7 channels in a pass of 8 (one padding channel), 196 windows a plane (a partial
    # table block); 3x3 pool 3 with padding, rows of 60 (four 16-column blocks, the last partial);
    # pool 2x3; pool 3x2 with pool stride 3 along rows; 5x5 pool 3; a conv stride of 2 with a 4x2
    # kernel (two stacks, rows past the kernel's dropped), 13 channels in passes of 8; a 6x7
    # kernel (two stacks of two vectors) with padding 3, 3 channels in a pass of 4.
    "stacks_5x5": (8, 1, 28, 28, 7, 5, 5, 1, 2, 2, 2),
    "stacks_pool3": (8, 1, 37, 60, 5, 3, 3, 1, 1, 3, 2),
    "stacks_pool_2x3": (8, 1, 30, 33, 6, 3, 3, 1, 0, (2, 3), 2),
    "stacks_row_stride": (8, 1, 31, 30, 6, 5, 5, 1, 0, (3, 2), (3, 2)),
    "stacks_5x5_pool3": (8, 1, 29, 29, 4, 5, 5, 1, 2, 3, 2),
    "stacks_strided": (8, 1, 17, 15, 13, 4, 2, 2, 1, 2, 2),
    "stacks_wide_rows": (2, 1, 15, 20, 3, 6, 7, 1, 3, 2, 2),
    # At least 32 input channels and 9 to 16 output channels, or a stride: the CPU forward's
    # ATen conv and its ReLU/pool pass, with pool stride 2 (pairs of columns; pool 2 and 3) and 3.
    "aten_conv": (2, 32, 9, 10, 11, 3, 3, 1, 1, 2, 2),
    "aten_conv_pool3": (2, 40, 11, 12, 12, 5, 5, 1, 2, 3, 2),
    "aten_conv_strides": (2, 33, 10, 11, 5, 3, 3, 2, 1, 2, 3),
    # Float32 patches of depth >= 576 over <= 64 conv outputs per plane, more than 16 output
    # channels: the CPU forward's channels-last ATen conv and its ReLU/pool pass (lanes over
    # output channels: 23 = a vector and a tail of 7), with pool 3 stride 2 and with strides.
    "cl_conv": (2, 65, 7, 8, 23, 3, 3, 1, 1, 3, 2),
    "cl_conv_strides": (2, 64, 12, 11, 20, 3, 3, 2, 1, 2, (2, 1)),
    # Pooled, at least 32 input channels, at most 16 output channels, stride 1, at least 144 conv
    # outputs a plane, 3x3 kernels or fewer than 16 outputs: the CPU forward's flat kernel
    # (flat_pool_suits: the K - 1 positions past each conv row computed and dropped, the padding's
    # zeros multiplied); blocks of 7 output channels over 7, of 4 over 4, of 5 over 5; over 9 and
    # over 10 outputs of samples of 32 KiB and more (kFlatWideSampleBytes) one block of 10
    # (flat_pool_grad, flat_pool_5x5_9), of smaller ones (float32; float64 doubles them) blocks of 5
    # (flat_pool_small_10: two), over 11 one block of 12 (flat_pool_12), over 13 one of 14
    # (flat_pool_13), or of smaller ones two of 7, the last with 6 (flat_pool_small_13); planes of
    # 930 and 1024 conv outputs, a 3x2 kernel with padding on one axis and overlapping pools, 5x5
    # kernels over 144 and 182 conv outputs. With 3x3 kernels, at most 10 outputs and pools of 2 the
    # input gradient is the flat kernel's too (flat_pool_grad_input_suits: a transposed conv of the
    # unpooled gradient): flat_pool, and flat_pool_grad without padding (the transposed conv's
    # padding 2) over odd rows.
    "flat_pool": (2, 37, 30, 31, 7, 3, 3, 1, 1, 2, 2),
    "flat_pool_grad": (2, 32, 19, 18, 10, 3, 3, 1, 0, 2, 2),
    "flat_pool3": (2, 33, 32, 33, 4, 3, 2, 1, (1, 0), 3, 2),
    "flat_pool_5x5": (2, 32, 12, 12, 5, 5, 5, 1, 2, 2, 2),
    "flat_pool_5x5_9": (2, 32, 14, 13, 9, 5, 5, 1, 2, 2, 2),
    "flat_pool_13": (2, 34, 16, 16, 13, 3, 3, 1, 1, 2, 2),
    "flat_pool_small_10": (2, 32, 15, 15, 10, 3, 3, 1, 0, 2, 2),
    "flat_pool_small_13": (2, 32, 15, 15, 13, 3, 3, 1, 0, 2, 2),
    "flat_pool_12": (2, 32, 16, 16, 11, 3, 3, 1, 1, 2, 2),
    # Pools of 2 read in place (relu_pool_plane_2x2) over 17 pooled columns: a float32 block of
    # 16 from whole vectors, then one column from 3 masked lanes (float64: blocks of 8, 8, 1).
    "flat_pool_wide": (2, 32, 36, 35, 6, 3, 3, 1, 1, 2, 2),
    # At least 32 input channels, at most 8 output channels, stride 1, fewer than 144 conv
    # outputs a plane where pooled: the CPU forward's tap GEMM (shifted tap rows, taps on padding
    # skipped); odd channel counts (row blocks of 6 and fewer), samples rounded up to whole
    # vectors (90 pixels: 6 vectors, blocks of 4 and a last one of 2), a 5x5 kernel. Without
    # pooling it takes every plane: samples of 930 pixels (59 vectors: a last block of 3).
    "tap_gemm": (2, 37, 9, 10, 7, 3, 3, 1, 1, 2, 2),
    "tap_gemm_5x5": (2, 40, 11, 12, 8, 5, 5, 1, 2, 2, 2),
    "tap_gemm_no_pool": (2, 35, 9, 10, 6, 3, 3, 1, 1, 1, 1),  # pool_size=1: ReLU/argmax per value
    "tap_gemm_large": (2, 37, 30, 31, 7, 3, 3, 1, 1, 1, 1),
    # The GEMM's kernels are instantiated per rows (1-6) and vectors (1-4) of a block: the rows
    # above end in blocks of 3, 2, 6 and 3 rows; this one in 5 rows (125 = 5 x 5 x 5) over 1
    # vector (132 pixels: 9 vectors).
    "tap_gemm_rows5": (2, 32, 11, 12, 5, 5, 5, 1, 2, 2, 2),
    # Planes of 256 pixels (1 KiB of float32, 2 KiB of float64): the tap GEMM copies each
    # block of columns into a panel and prefetches the next (kTapAliasBytes); 63 GEMM rows.
    "tap_gemm_aliased": (2, 34, 16, 16, 7, 3, 3, 1, 1, 1, 1),
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
    "tiny",
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
    "tiny": (5, 7, 4),  # small enough for a float64 gradcheck in Triton's interpreter
    # the CPU forward's dot products (8-12 outputs): 4-row blocks plus 3 rows, 5-output blocks
    # plus 1, a masked tail vector; then in_features shorter than a vector (scalar tail). Where
    # MKL runs AVX-512 code these four dot_ rows take the GEMM path unforced (dot_beats_mkl),
    # and the dot products under FASTLENET_CPU_GEMM=hand (tests/test_linear_relu_cpu.py).
    "dot_tails": (39, 13, 11),
    "dot_short": (6, 5, 9),
    # the CPU's float32 hand GEMM (csrc/linear_relu_cpu_gemm.h; lenet_fc1, odd, odd_small and
    # tile_64 take it too, with tails of 8, 1 and 7 lanes and both tile orders): a forward
    # deeper than the backward products' kGemmMaxDepth, in one panel of w^T; fewer rows than
    # kPackMinRows (the dot-product forward, hand backward)
    "deep_k": (6, 4099, 20),
    "few_rows": (3, 40, 50),
    # the hand GEMM's forward over several panels of w^T (gemm_nt_panels, 512 KiB each), its
    # sums going on from one panel to the next: split by columns (a thread's 160 columns, or
    # alone 304: panels of 819 or 431 inputs) and by rows (48 columns: panels of 2730 inputs)
    "panels": (20, 1000, 300),
    "rows_split_panels": (19, 3000, 45),
    # grad_input's product in column-block order (w, 260 deep by 1100 columns, is over 512 KiB)
    # with b's rows a page apart or more (kGemmPackMinStride): each panel of w copied first;
    # 1100 = 34 x 32 + 12 columns
    "packed_panels": (24, 1100, 260),
    # the dot-product forward of up to 8 rows where w is large (kDotMinWeights), its tasks a
    # row block by a span of outputs: a block of 4 rows and one of 3, spans of 30 outputs and a
    # last of 11 (5-output blocks plus 1); 2 rows in two spans of 25 and 22
    "dot_wide": (7, 1100, 131),
    "dot_spans": (2, 3000, 47),
    # the hand GEMM's forward split by rows (kRowSplitMaxVectors): one vector of outputs with a
    # masked tail, and three; row blocks of 8 plus a tail of 5 and of 3
    "rows_split": (1037, 129, 13),
    "rows_split_3v": (203, 150, 45),
    # a layer whose op runs on one thread by w's row shares (owner_split: 32768 weights and up):
    # LeNet-5's fc1 at batch 1, and two rows with shares that end inside a row of w
    "shares_one_row": (1, 400, 120),
    "shares_two_rows": (2, 333, 101),
    "shares_empty_batch": (0, 400, 120),  # no rows: the usual path
}

#: The shapes Triton runs (see the module docstring).
TRITON_LINEAR = [
    "lenet_fc1_small",
    "odd_small",
    "row_blocks",
    "feature_blocks",
    "one",
    "tiny",
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


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    """torch.randn drawn on the CPU and moved to `device`: every backend's tests see the same
    values, so what a test checks of its data (windows of both kinds occur, ...) holds on every
    device when it holds on this one."""
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_(requires_grad)


def conv_inputs(geometry, dtype, device="cpu", requires_grad=True):
    """Random input, weight and bias of `geometry`, and its stride, padding, pool_size and
    pool_stride as pairs."""
    n, c, h, w, o, kh, kw, *rest = geometry
    x, weight, bias = (
        randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)
        for shape in ((n, c, h, w), (o, c, kh, kw), (o,))
    )
    return x, weight, bias, pairs(rest)


def linear_inputs(shape, dtype, device="cpu", requires_grad=True, bias=True):
    """Random input, weight and bias (None without `bias`) of shape (rows, in, out)."""
    m, k, n = shape
    make = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    x, weight = randn(m, k, **make), randn(n, k, **make)
    return x, weight, randn(n, **make) if bias else None


def conv_op_args(geometry, dtype, backend="cpu"):
    """Arguments of `backend`'s ops: input, weight, bias, the geometry as pairs, a random
    grad_out and the argmax the backend's forward saves."""
    x, weight, bias, geom = conv_inputs(geometry, dtype, device(backend), requires_grad=False)
    out, argmax = backends.ops("conv_relu_pool", backend).fwd(x, weight, bias, *geom)
    return x, weight, bias, geom, torch.randn_like(out), argmax


# --- backends ---------------------------------------------------------------------------------

#: Every backend, and the ones with kernels of their own (the reference is their oracle).
BACKENDS = ("cpu", "cuda", "triton", "reference")
KERNELS = ("cpu", "cuda", "triton")


def device(backend):
    """The device of a backend's tensors in the tests: CUDA for "cuda", and for "triton" unless
    it runs in its interpreter (on CPU tensors); CPU for "cpu" and "reference"."""
    if backend == "cuda" or (backend == "triton" and not backends.triton_interpreted()):
        return "cuda"
    return "cpu"


def _marks(backend):
    """The marks of a backend's rows, or None where its rows are left out (a CPU backend that
    is unavailable here, as conftest.CPU_BACKENDS)."""
    if device(backend) == "cpu":
        return [] if backend in CPU_BACKENDS else None
    marks = [pytest.mark.gpu]
    status = backends.available_backends()[backend]
    if backend == "triton" and not status:
        marks.append(pytest.mark.skip(reason=f"triton backend: {status}"))
    return marks


def _id(value):
    return str(value).removeprefix("torch.")


def param(backend, *values, id):
    """A test's row `values` on `backend`: a list of one pytest param with the backend's marks,
    or an empty list where the backend does not run here."""
    marks = _marks(backend)
    return [] if marks is None else [pytest.param(*values, id=id, marks=marks)]


def _cases(backend_names, names, small, axes):
    params = []
    for backend in backend_names:
        for name in names:
            if backend == "triton" and name is not None and name not in small:
                continue
            for values in itertools.product(*axes):
                row = (backend,) if name is None else (backend, name)
                ids = ([] if name is None else [name]) + [_id(v) for v in values] + [backend]
                params += param(backend, *row, *values, id="-".join(ids))
    return params


def conv_cases(backend_names, names, *axes):
    """pytest params (backend, name, *values): every backend of `backend_names` that runs here,
    every geometry of `names` it runs (Triton: those of TRITON_CONV), and every combination of
    one value of each of `axes`."""
    return _cases(backend_names, names, TRITON_CONV, axes)


def linear_cases(backend_names, names, *axes):
    """As conv_cases, for the shapes of LINEAR (Triton: those of TRITON_LINEAR)."""
    return _cases(backend_names, names, TRITON_LINEAR, axes)


def backend_cases(backend_names, *axes):
    """pytest params (backend, *values): as conv_cases, without a geometry."""
    return _cases(backend_names, [None], (), axes)
