"""64-bit indexing: the C++ CPU forward on an input whose flat index passes 2^31.

The input is (1, 2, 32770, 32770) float32: 2^31 + 262,152 elements (8.6 GB), so the last 8
rows of channel 1 lie past flat index 2^31. With a 3x3 kernel and 4x4 pooling the conv output
is 32768 = 8192 * 4 rows, so the last pooled row reads the input's last 6 rows: a 32-bit offset
anywhere (row * width, channel * plane) would read the wrong place or fault. One output channel
keeps the output small (8192^2 floats, 268 MB).

Only the C++ backend runs here: the reference would materialise a full-size conv output and
int64 pooling indices (over 30 GB), and the Triton interpreter copies every tensor to NumPy.
Peak memory is about 9 GB, so at most one such test may run at a time (the suite's
/tmp/fastlenet-cpu.lock serialises heavy runs on the shared machine).
"""

import pytest
import torch
import torch.nn.functional as F

from fastlenet import _ext

C, SIDE, K, POOL = 2, 32770, 3, 4  # (SIDE - K + 1) = 32768 = 8192 * POOL: every row is read


@pytest.mark.slow
@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_forward_past_int32_flat_index():
    assert C * SIDE * SIDE > 2**31
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(1, C, SIDE, SIDE).uniform_(-1, 1, generator=gen)
    weight = torch.randn(1, C, K, K, generator=gen)
    bias = torch.randn(1, generator=gen) * 0.1
    geom = ([1, 1], [0, 0], [POOL, POOL], [POOL, POOL])
    out, argmax = torch.ops.fastlenet.conv_relu_pool_fwd(x, weight, bias, *geom)
    pooled = (SIDE - K + 1) // POOL
    assert out.shape == argmax.shape == (1, 1, pooled, pooled)
    last = pooled - 1
    # Windows whose input patch ends in the last row or column, and a few others.
    spots = [(last, last), (last, 0), (last, pooled // 2), (0, last), (pooled // 2, last)]
    spots += [(last - 1, last - 3), (0, 0), (pooled // 3, 2 * pooled // 3)]
    start = (SIDE - 1) * SIDE + (C - 1) * SIDE * SIDE  # flat index of the last row's start
    assert start > 2**31
    for ph, pw in spots:
        r, c = ph * POOL, pw * POOL
        patch = x[:, :, r : r + POOL + K - 1, c : c + POOL + K - 1].double()
        conv = F.conv2d(patch, weight.double(), bias.double()).flatten()  # the 16 window values
        best = conv.max()
        assert out[0, 0, ph, pw].item() == pytest.approx(max(best.item(), 0.0), rel=1e-5, abs=1e-6)
        if best <= 0:
            assert argmax[0, 0, ph, pw].item() == 255
        else:
            # The kernel's float32 sums may order two nearly equal values differently.
            near = (conv >= best - 1e-4 * best.abs()).nonzero().flatten().tolist()
            assert argmax[0, 0, ph, pw].item() in near
    assert (argmax != 255).sum() > 0 and (argmax == 255).sum() > 0
