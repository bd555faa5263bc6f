"""linear_relu on the C++ CPU backend alone: both kernels of its float32 products (the hand
AVX-512 GEMM and the BLAS) wherever the CPU chooses one, and how it chooses (csrc/
linear_relu_cpu.cpp, gemm_choice). What every backend has is in tests/test_linear_relu.py."""

import pytest
import torch
from conftest import rel_err
from geometry import F32, LINEAR, TOL, linear_inputs

from fastlenet import _ext, backends, reference

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")

ENV = "FASTLENET_CPU_GEMM"
#: Rows whose products the hand kernel takes where it runs (AVX-512 builds), with tails and
#: tile orders of their own (geometry.LINEAR), and LeNet-5's layers.
HAND_ROWS = [
    *("lenet_fc1", "lenet_fc2", "lenet_fc3", "odd", "odd_small", "deep_k", "few_rows"),
    *("rows_split", "rows_split_3v", "panels", "rows_split_panels", "packed_panels"),
]
#: Rows of the forward's dot products (dot_suits), which FASTLENET_CPU_GEMM=hand takes on any
#: CPU, and unforced only where MKL runs no AVX-512 code or they beat it (dot_beats_mkl).
DOT_ROWS = [
    *("one_row", "dot_tails", "dot_short", "dot_wide", "dot_spans"),
    *("shares_one_row", "shares_two_rows"),
]
#: A backward whose products run one after the other, each over all threads (side_by_side in
#: csrc/linear_relu_cpu.cpp): grad_weight 4 MiB, 32 times grad_input.
WIDE_FEW_ROWS = pytest.param((4, 8192, 128), id="wide_few_rows")


def _fwd_bwd(name, relu):
    shape = LINEAR[name] if isinstance(name, str) else name
    x, weight, bias = linear_inputs(shape, F32, requires_grad=False)
    ops = backends.ops("linear_relu", "cpu")
    out = ops.fwd(x, weight, bias, relu)
    grad = torch.randn_like(out)
    return (x, weight, bias, grad), out, ops.bwd(grad, out, x, weight, relu)


def _each_choice(monkeypatch, shape):
    """_fwd_bwd(shape, True) under FASTLENET_CPU_GEMM=auto, hand and blas, from the same inputs."""
    results = {}
    for gemm in ("auto", "hand", "blas"):
        monkeypatch.setenv(ENV, gemm)
        torch.manual_seed(0)
        results[gemm] = _fwd_bwd(shape, True)
    return results


def _blas_runs_avx512() -> bool:
    """What the op decides from (blas_runs_avx512): MKL, on an Intel CPU."""
    with open("/proc/cpuinfo") as f:
        intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    return torch.backends.mkl.is_available() and intel


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("gemm", ["hand", "blas"])
@pytest.mark.parametrize("name", [*HAND_ROWS, *DOT_ROWS, WIDE_FEW_ROWS])
def test_each_gemm_matches_reference(monkeypatch, name, gemm, relu):
    """Forced to either kernel, forward and every gradient match the float64 reference."""
    monkeypatch.setenv(ENV, gemm)
    (x, weight, bias, grad), out, got = _fwd_bwd(name, relu)
    x64, w64 = x.double(), weight.double()
    ref_out = reference.linear_relu_fwd(x64, w64, bias.double(), relu)
    assert rel_err(out, ref_out) < TOL[F32]
    want = reference.linear_relu_bwd(grad.double(), out.double(), x64, w64, relu)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and rel_err(g, r) < TOL[F32]


#: A backward whose products the two kernels sum in different orders (the hand kernel in one
#: chain per element; MKL's sgemm blocks a depth of 600 batch rows), so that their results
#: differ bitwise. At LeNet-5's sizes (depth 64-120) MKL's sums are the hand kernel's, bit for
#: bit.
DIFFERING = (600, 33, 65)


def test_backward_takes_the_blas_where_it_runs_avx512(monkeypatch):
    """Unforced, the backward's products are the BLAS's where MKL runs its AVX-512 code (an Intel
    CPU), else the hand kernel's: bitwise the forced run of that kernel."""
    results = {gemm: got for gemm, (_, _, got) in _each_choice(monkeypatch, DIFFERING).items()}

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(results[a], results[b], strict=True))

    if same("hand", "blas"):  # also where the BLAS is no MKL (not measured)
        pytest.skip("no hand kernel in this build (no AVX-512): both choices are the BLAS")
    assert same("auto", "blas" if _blas_runs_avx512() else "hand")


@pytest.mark.parametrize(
    ("shape", "dot_on_mkl"),
    [((16, 84, 10), False), ((16, 784, 10), True), ((3, 400, 120), False), ((1, 400, 120), True)],
    ids=["fc3_16_rows", "784_to_10", "three_rows", "one_row"],
)
def test_forward_takes_the_dot_products_where_they_win(monkeypatch, shape, dot_on_mkl):
    """Unforced, the forward's dot products (FASTLENET_CPU_GEMM=hand) or the BLAS (=blas), bitwise:
    where MKL runs its AVX-512 code the dot products only where they beat it (dot_beats_mkl:
    LeNet-5's fc3 and three rows of 400 -> 120 take the BLAS; 784 -> 10 and one row the dot
    products), elsewhere wherever dot_suits. Below kHandMinRows (32) rows, where the GEMM path
    is MKL's even in a build with the hand GEMM."""
    outs = {gemm: out for gemm, (_, out, _) in _each_choice(monkeypatch, shape).items()}
    if torch.equal(outs["hand"], outs["blas"]):
        pytest.skip("the dot products and the BLAS gave the same bits here")
    expected = "hand" if dot_on_mkl or not _blas_runs_avx512() else "blas"
    assert torch.equal(outs["auto"], outs[expected])


def test_bad_choice_is_named(monkeypatch):
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(RuntimeError, match=f"{ENV} must be auto, hand or blas, got 'fast'"):
        _fwd_bwd("lenet_fc2", True)
