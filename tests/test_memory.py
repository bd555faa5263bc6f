"""The CPU ops' reuse of their large tensors' memory (csrc/cpu_reuse.h, fastlenet/memory.py):
a freed block serves the next tensor of its size, the tensors behave as at::empty's (resize,
shared memory), what is kept is bounded and can be released."""

import os
import threading

import pytest
import torch
from conftest import rel_err

import fastlenet
from fastlenet import _ext, reference
from fastlenet.functional import conv_relu_pool2d

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")

MIB = 2**20
# A conv output of 1.2 MB (above csrc/cpu_reuse.h's kReuseMinBytes of 1 MiB) and its argmax.
SHAPE = (32, 32, 26, 26)
CAP = 512 * MIB  # kReuseMaxCached


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    w = torch.randn(64, 32, 3, 3, generator=g) * 0.1
    b = torch.randn(64, generator=g) * 0.1
    return x, w, b


@pytest.fixture(autouse=True)
def _empty_pool():
    fastlenet.release_cached_buffers()
    yield
    fastlenet.release_cached_buffers()


def test_freed_output_memory_serves_the_next_call():
    x, w, b = _inputs()
    with torch.no_grad():
        y = conv_relu_pool2d(x, w, b, backend="cpu")
        assert y.nbytes >= MIB
        live = fastlenet.cached_buffers()["live"]
        assert live >= y.nbytes
        ptr = y.data_ptr()
        y.fill_(float("nan"))  # what the next call finds there
        del y
        assert fastlenet.cached_buffers() == {"kept": live, "live": 0}
        y = conv_relu_pool2d(x, w, b, backend="cpu")
    assert y.data_ptr() == ptr
    assert fastlenet.cached_buffers() == {"kept": 0, "live": live}
    expected = reference.conv_relu_pool2d(x.double(), w.double(), b.double(), 1, 0, 2, 2)
    assert rel_err(y, expected) < 1e-5


def test_of_several_blocks_of_a_size_the_one_freed_last_serves_first():
    # Its lines are the likeliest still in cache; the one kept longest is the coldest.
    x, w, b = _inputs()
    with torch.no_grad():
        y0, y1, y2 = (conv_relu_pool2d(x, w, b, backend="cpu") for _ in range(3))
        ptrs = [y0.data_ptr(), y1.data_ptr(), y2.data_ptr()]
        assert len(set(ptrs)) == 3
        del y0
        del y1
        del y2
        y = conv_relu_pool2d(x, w, b, backend="cpu")
        assert y.data_ptr() == ptrs[2]
        z = conv_relu_pool2d(x, w, b, backend="cpu")
        assert z.data_ptr() == ptrs[1]
    expected = reference.conv_relu_pool2d(x.double(), w.double(), b.double(), 1, 0, 2, 2)
    assert rel_err(z, expected) < 1e-5


def test_small_tensors_take_the_default_allocator():
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        y = fastlenet.ConvReLUPool2d(1, 6, 5)(x)
    assert y.nbytes < MIB
    assert fastlenet.cached_buffers() == {"kept": 0, "live": 0}


def test_release_frees_what_is_kept():
    x, w, b = _inputs()
    with torch.no_grad():
        y = conv_relu_pool2d(x, w, b, backend="cpu")
    del y
    kept = fastlenet.cached_buffers()["kept"]
    assert kept >= MIB
    assert fastlenet.release_cached_buffers() == kept
    assert fastlenet.cached_buffers() == {"kept": 0, "live": 0}
    assert fastlenet.release_cached_buffers() == 0


def test_reused_tensors_resize_and_share_as_stock_tensors_do():
    x, w, b = _inputs()
    with torch.no_grad():
        y = conv_relu_pool2d(x, w, b, backend="cpu")
    values = y.clone()
    n = y.numel()
    y.resize_(4 * n)  # a larger block through the same allocator, the values kept
    assert torch.equal(y[:n].view_as(values), values)
    assert fastlenet.cached_buffers()["live"] >= 4 * n * 4
    y.resize_(n)
    y.share_memory_()  # copied into shared memory, as any CPU tensor is
    assert y.is_shared()
    assert torch.equal(y.view_as(values), values)


def test_kept_memory_stays_under_its_bound():
    x, w, b = _inputs()
    with torch.no_grad():  # six blocks of ~100 MB, every size different, then freed
        blocks = [
            conv_relu_pool2d(x, w, b, backend="cpu").resize_(25 * MIB + i * 4096) for i in range(6)
        ]
    del blocks
    kept = fastlenet.cached_buffers()["kept"]
    assert 4 * 100 * MIB < kept <= CAP
    # A size the pool does not hold: kept blocks of other sizes go until it fits the bound.
    with torch.no_grad():
        big = conv_relu_pool2d(x, w, b, backend="cpu").resize_(50 * MIB)  # 200 MB
    assert fastlenet.cached_buffers()["kept"] + big.nbytes <= CAP


def test_a_full_pool_keeps_the_sizes_in_use():
    """With the pool full of blocks of other sizes (an earlier model, shape or batch size), two
    outputs freed together are both kept, the blocks kept longest going instead: the next call
    of the same sizes takes both from the pool. (It used to give back the one that did not fit
    and keep the stale blocks; the next call missed it and mapped it fresh.)"""
    x, w, b = _inputs()
    with torch.no_grad():  # five blocks of ~100 MB kept, ~500 MB
        blocks = [
            conv_relu_pool2d(x, w, b, backend="cpu").resize_(25 * MIB + i * 4096) for i in range(6)
        ]
    del blocks
    sizes = (2 * MIB, 2 * MIB + 16384)  # 8 MiB and 8 MiB + 64 KiB: whole 64 KiB granules

    def outputs():
        with torch.no_grad():
            return [conv_relu_pool2d(x, w, b, backend="cpu").resize_(n) for n in sizes]

    first = outputs()
    assert fastlenet.cached_buffers()["kept"] + sum(t.nbytes for t in first) > CAP
    del first
    kept = fastlenet.cached_buffers()["kept"]
    assert kept <= CAP
    second = outputs()
    # Both taken from the pool: nothing else left it (a miss would have evicted ~100 MB).
    assert kept - fastlenet.cached_buffers()["kept"] == sum(t.nbytes for t in second)


def test_threads_allocate_and_free_concurrently():
    x, w, b = _inputs()
    with torch.no_grad():
        expected = conv_relu_pool2d(x, w, b, backend="cpu")
    live = fastlenet.cached_buffers()["live"]  # expected's block
    outs, errors = [], []

    def work():
        try:
            for _ in range(20):
                with torch.no_grad():
                    y = conv_relu_pool2d(x, w, b, backend="cpu")
                outs.append(torch.equal(y, expected))
                del y
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(outs) == 60 and all(outs)
    assert fastlenet.cached_buffers()["live"] == live  # every thread's tensors given back


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dropout_noise_is_kept_for_reuse(layout):
    x = torch.randn(8, 16, 64, 64, requires_grad=True)  # 2 MiB
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = fastlenet.functional.dropout(x, 0.5)  # the noise, saved for backward
    assert fastlenet.cached_buffers()["live"] >= x.nbytes
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)  # stock's layout: the noise is x's
    del y
    stats = fastlenet.cached_buffers()
    assert stats["live"] == 0 and stats["kept"] >= x.nbytes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_a_pool_of_its_own():
    """A child of fork() (a DataLoader worker) gets a fresh pool: the parent's lock may have
    been held at the fork. A block of the parent's freed in the child is kept there, counted in
    neither pool's live bytes."""
    x, w, b = _inputs()
    with torch.no_grad():
        y, kept = (conv_relu_pool2d(x, w, b, backend="cpu") for _ in range(2))
    del kept  # the parent's pool holds one block, y another
    parent = fastlenet.cached_buffers()
    assert parent["kept"] == parent["live"] > 0
    pid = os.fork()
    if pid == 0:  # the child: no OpenMP, no pytest; the verdict in the exit code
        del y
        stats = fastlenet.cached_buffers()  # the parent's pool would say 2 blocks kept
        os._exit(0 if stats == {"kept": parent["live"], "live": 0} else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fastlenet.cached_buffers() == parent
