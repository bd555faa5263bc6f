"""Numerical edge cases: every backend that runs on CPU tensors gives stock PyTorch's answer.

The oracle is the stock composition (conv2d -> relu -> max_pool2d, linear -> relu) run by
autograd in float64 on the same values. Outputs and every gradient must have NaN exactly where
stock has NaN, +/-Inf exactly where stock has it (with the same sign), and finite values within
the dtype's tolerance elsewhere. Cases with exact ties use small integers, where every sum is
exact, and must then match bitwise.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, rel_err

from fastlenet import backends
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu

NAN, INF = float("nan"), float("inf")
# float32 kernels against a float64 oracle: sums of at most a few hundred products.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
GEOM = {"stride": 1, "padding": 1, "pool_size": 2, "pool_stride": None}  # padding: edge taps


def _stock_conv(x, w, b, stride=1, padding=0, pool_size=2, pool_stride=None):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, padding)), pool_size, pool_stride)


def _stock_linear(relu):
    def fn(x, w, b):
        y = F.linear(x, w, b)
        return F.relu(y) if relu else y

    return fn


def _run(fn, tensors, needs, grad_out=None, dtype=None):
    """fn's output and the gradients of the tensors in `needs` (None where not needed)."""
    leaves = [
        None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(n)
        for t, n in zip(tensors, needs, strict=True)
    ]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(())
    if wanted:
        g = torch.randn_like(out) if grad_out is None else grad_out.to(out.dtype)
        grads = iter(torch.autograd.grad(out, wanted, g))
    return out, [None if t is None or not t.requires_grad else next(grads) for t in leaves]


def _nonfinite(t):
    """Where t is NaN, +Inf and -Inf."""
    return t.isnan(), t == INF, t == -INF


def _where(mask):
    return mask.nonzero().tolist()[:6]


def _same_nonfinite(got, want):
    return all(map(torch.equal, _nonfinite(got), _nonfinite(want)))


def _assert_matches(gots, oracles, tol):
    """gots: {name: tensor}; oracles: stock's {name: tensor} in the tensors' dtype and in
    float64. NaN, +Inf and -Inf must be exactly where stock has them, and values within `tol`
    (relative) elsewhere. Where stock's two dtypes disagree on the non-finite positions (its
    float32 and float64 convolutions do: only the latter multiplies padding zeros by an Inf
    weight), matching either one, in every tensor at once, is stock's behaviour; values are
    then compared with that one (float64 when both match)."""
    for name, got in gots.items():
        for oracle in oracles:
            assert got.shape == oracle[name].shape, f"{name}: shape {tuple(got.shape)}"
    same = [o for o in oracles if all(_same_nonfinite(g, o[n]) for n, g in gots.items())]
    if not same:
        name = next(n for n, g in gots.items() if not _same_nonfinite(g, oracles[-1][n]))
        got, want = _nonfinite(gots[name]), _nonfinite(oracles[-1][name])
        raise AssertionError(
            f"{name}: NaN at {_where(got[0])}, stock at {_where(want[0])}; "
            f"+Inf at {_where(got[1])}, stock at {_where(want[1])}; "
            f"-Inf at {_where(got[2])}, stock at {_where(want[2])}"
        )
    for name, got in gots.items():
        finite = got.isfinite()
        err = rel_err(got[finite], same[-1][name][finite])
        assert err <= tol, f"{name}: values differ from stock (relative error {err:.2e})"


def _compare(fn, stock, tensors, needs=None, tol=None, grad_out=None):
    """Runs `fn` and stock (in the tensors' dtype and in float64) on the same values, and
    compares the outputs and every gradient."""
    needs = needs or [t is not None for t in tensors]
    dtype = tensors[0].dtype
    tol = TOL[dtype] if tol is None else tol
    if grad_out is None:
        out_shape = stock(*[None if t is None else t.double() for t in tensors]).shape
        grad_out = torch.randn(out_shape, dtype=dtype)
    names = ("output", "grad of input", "grad of weight", "grad of bias")

    def named(out, grads):
        return {n: t for n, t in zip(names, [out, *grads], strict=True) if t is not None}

    out, grads = _run(fn, tensors, needs, grad_out)
    refs = [_run(stock, tensors, needs, grad_out, dtype=d) for d in (dtype, torch.float64)]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads if g is not None)
    assert [g is None for g in grads] == [g is None for g in refs[0][1]]
    _assert_matches(named(out, grads), [named(*r) for r in refs], tol)
    return out, grads


def _conv(backend, **geom):
    geom = {**GEOM, **geom}
    return (
        lambda x, w, b: conv_relu_pool2d(x, w, b, **geom, backend=backend),
        lambda x, w, b: _stock_conv(x, w, b, **geom),
    )


def _conv_tensors(n=2, c=3, h=9, w=8, o=5, k=3, dtype=torch.float32):
    return [
        torch.randn(n, c, h, w, dtype=dtype),
        torch.randn(o, c, k, k, dtype=dtype),
        torch.randn(o, dtype=dtype),
    ]


def _lin_tensors(batch=(6,), i=7, o=5, dtype=torch.float32):
    return [torch.randn(*batch, i, dtype=dtype), torch.randn(o, i), torch.randn(o)]


LINEAR_FNS = [(linear_relu, _stock_linear(True)), (linear, _stock_linear(False))]
LINEAR_IDS = ["linear_relu", "linear"]

# --- NaN and +/-Inf ---------------------------------------------------------------------------


def _poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


NONFINITE_CONV = [
    ("nan_input", 0, (0, 1, 4, 3), NAN),
    ("nan_input_corner", 0, (1, 0, 0, 0), NAN),  # under the padding edge
    ("two_nans_one_window", 0, ((0, 0), (2, 2), (3, 3), (4, 5)), NAN),
    ("inf_input", 0, (0, 2, 5, 5), INF),
    ("neg_inf_input", 0, (1, 1, 2, 6), -INF),
    ("inf_and_neg_inf_input", 0, ((0, 0), (1, 1), (3, 3), (3, 4)), torch.tensor([INF, -INF])),
    ("nan_weight", 1, (2, 1, 1, 1), NAN),
    ("inf_weight", 1, (0, 0, 2, 2), INF),
    ("neg_inf_weight", 1, (4, 2, 0, 1), -INF),
    ("nan_bias", 2, (3,), NAN),
    ("inf_bias", 2, (1,), INF),
    ("neg_inf_bias", 2, (2,), -INF),
]


#: (input, output) channels: few; the C++ CPU forward's tap GEMM (32 -> 5); its ATen conv
#: (32 -> 12; without pooling flat_forward, and ATen's conv for a non-finite weight); its wide
#: backward kernels (16 -> 24); its channels-last ATen conv (64 -> 20, without padding: 7x6
#: conv outputs).
CONV_CHANNELS = [(3, 5), (32, 5), (32, 12), (16, 24), (64, 20)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool_size", [2, 1], ids=["pool2", "no_pool"])  # ATen conv, tap GEMM
@pytest.mark.parametrize("padding", [0, 1], ids=["pad0", "pad1"])
@pytest.mark.parametrize(("c", "o"), CONV_CHANNELS, ids=[f"{c}to{o}" for c, o in CONV_CHANNELS])
@pytest.mark.parametrize(
    ("which", "index", "value"),
    [pytest.param(*c[1:], id=c[0]) for c in NONFINITE_CONV],
)
def test_conv_nonfinite(which, index, value, c, o, padding, pool_size, backend):
    """Without padding a non-finite weight tap reaches only the inputs it multiplies, so the
    NaN pattern of grad_input shows whether a kernel spreads it further."""
    tensors = _conv_tensors(c=c, o=o)
    tensors[which] = _poison(tensors[which], index, value)
    _compare(*_conv(backend, padding=padding, pool_size=pool_size), tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", [0, 1], ids=["pad0", "pad1"])
@pytest.mark.parametrize(
    ("which", "index", "value"),
    [pytest.param(*c[1:], id=c[0]) for c in NONFINITE_CONV],
)
def test_conv_nonfinite_flat_pool(which, index, value, padding, backend):
    """32 -> 6 over 14x14 and 16x16 conv outputs: the C++ CPU forward's flat kernel
    (flat_pool_suits) and its input gradient's (flat_pool_grad_input_suits), which multiply
    the padding's and the unpooled gradient's zeros; ATen's conv and the sparse backward for a
    non-finite weight."""
    tensors = _conv_tensors(c=32, o=6, h=16, w=16)
    tensors[which] = _poison(tensors[which], index, value)
    _compare(*_conv(backend, padding=padding), tensors)


#: One input channel, at least 128 pooling windows a batch: the C++ CPU grad_w from stacked rows
#: (csrc/conv_relu_pool_cpu_bwd_stacks.h), whose sparse sums need the dense fallback here.
ONE_CHANNEL_NONFINITE = [
    ("nan_input", (1, 0, 7, 4), NAN),
    ("inf_input_corner", (3, 0, 0, 15), INF),  # under the padding edge
    ("neg_inf_input", (2, 0, 15, 9), -INF),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", [0, 2], ids=["pad0", "pad2"])
@pytest.mark.parametrize(
    ("index", "value"), [pytest.param(*c[1:], id=c[0]) for c in ONE_CHANNEL_NONFINITE]
)
def test_conv_nonfinite_one_channel(index, value, padding, backend):
    tensors = _conv_tensors(n=4, c=1, h=16, w=16, o=6, k=5)
    tensors[0] = _poison(tensors[0], index, value)
    _compare(*_conv(backend, padding=padding), tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool_size", [2, 1], ids=["pool2", "no_pool"])  # no_pool: flat grad_x
def test_conv_nonfinite_grad_out(backend, pool_size):
    tensors = _conv_tensors()
    out_shape = _stock_conv(*tensors, **{**GEOM, "pool_size": pool_size}).shape
    grad_out = torch.randn(out_shape)
    grad_out[0, 1, 1, 1], grad_out[1, 3, 0, 2], grad_out[1, 0, 3, 3] = NAN, INF, -INF
    _compare(*_conv(backend, pool_size=pool_size), tensors, grad_out=grad_out)


NONFINITE_LINEAR = [
    ("nan_input", 0, (2, 3), NAN),
    ("inf_input", 0, (0, 6), INF),
    ("neg_inf_input", 0, (5, 0), -INF),
    ("nan_weight", 1, (1, 4), NAN),
    ("inf_weight", 1, (4, 2), INF),
    ("neg_inf_weight", 1, (0, 0), -INF),
    ("nan_bias", 2, (2,), NAN),
    ("inf_bias", 2, (3,), INF),
    ("neg_inf_bias", 2, (0,), -INF),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("fn", "stock"), LINEAR_FNS, ids=LINEAR_IDS)
@pytest.mark.parametrize(
    ("which", "index", "value"),
    [pytest.param(*c[1:], id=c[0]) for c in NONFINITE_LINEAR],
)
def test_linear_nonfinite(which, index, value, fn, stock, backend):
    tensors = _lin_tensors()
    tensors[which] = _poison(tensors[which], index, value)
    _compare(lambda x, w, b: fn(x, w, b, backend=backend), stock, tensors)


# --- ties and all-negative windows -------------------------------------------------------------


def _small_ints(*shape, low=-2, high=3):
    return torch.randint(low, high, shape).float()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "geom",
    [
        {"stride": 1, "padding": 0, "pool_size": 2, "pool_stride": None},
        {"stride": 1, "padding": 1, "pool_size": 3, "pool_stride": 2},  # overlapping windows
        {"stride": 2, "padding": 2, "pool_size": (2, 3), "pool_stride": (1, 2)},
    ],
    ids=["pool2", "overlapping", "strided"],
)
def test_conv_ties_route_like_max_pool2d(geom, backend):
    """Integer inputs make exact ties in most windows (and exact zeros): the gradient must go
    where max_pool2d sends it, so every gradient matches stock bitwise."""
    x, w, b = _small_ints(2, 2, 10, 9), _small_ints(4, 2, 2, 2, low=-1, high=2), _small_ints(4)
    fn, stock = _conv(backend, **geom)
    out = stock(x, w, b)
    grad_out = _small_ints(*out.shape, low=1, high=4)
    got, grads = _run(fn, [x, w, b], [True] * 3, grad_out)
    want, want_grads = _run(stock, [x, w, b], [True] * 3, grad_out)  # float32: exact here
    # The inputs do make ties: some window's max appears more than once.
    size = geom["pool_size"] if isinstance(geom["pool_size"], tuple) else (geom["pool_size"],) * 2
    step = geom["pool_stride"] or size
    conv = F.conv2d(x, w, b, geom["stride"], geom["padding"])
    windows = F.unfold(conv.flatten(0, 1)[:, None], size, stride=step)
    assert ((windows == windows.max(1, keepdim=True).values).sum(1) > 1).any()
    assert torch.equal(got, want)
    for name, g, wg in zip(("input", "weight", "bias"), grads, want_grads, strict=True):
        assert torch.equal(g, wg), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_argmax_is_max_pool2d_index(backend):
    """The saved window position is max_pool2d's index (first of tied values), or 255 where
    the window's max is <= 0."""
    x, w, b = _small_ints(2, 2, 8, 8), _small_ints(3, 2, 3, 3, low=-1, high=2), _small_ints(3)
    geom = ((1, 1), (1, 1), (2, 2), (2, 2))
    out, argmax = backends.ops("conv_relu_pool", backend).fwd(x, w, b, *geom)
    conv = F.conv2d(x, w, b, 1, 1)
    pooled, flat = F.max_pool2d(conv, 2, 2, return_indices=True)
    ow = conv.shape[-1]
    rows = flat // ow - torch.arange(pooled.shape[2]).view(-1, 1) * 2
    cols = flat % ow - torch.arange(pooled.shape[3]).view(1, -1) * 2
    want = torch.where(pooled > 0, rows * 2 + cols, 255).to(torch.uint8)
    assert (pooled == 0).any() and (pooled > 0).any()  # both kinds of window occur
    assert torch.equal(argmax, want)
    assert torch.equal(out, torch.relu(pooled))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_all_negative_windows_pass_no_gradient(backend):
    x, w, b = _conv_tensors()
    b = b - 1000  # every pre-activation is negative
    fn, stock = _conv(backend)
    _, grads = _compare(fn, stock, [x, w, b])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_some_negative_windows(backend):
    """Half the output channels are dead (all-negative windows), half are alive."""
    x, w, b = _conv_tensors(o=6)
    b[::2] -= 1000
    fn, stock = _conv(backend)
    out, (_, gw, gb) = _compare(fn, stock, [x, w, b])
    assert torch.equal(out[:, ::2], torch.zeros_like(out[:, ::2]))
    assert torch.equal(gw[::2], torch.zeros_like(gw[::2])) and gw[1::2].abs().sum() > 0
    assert torch.equal(gb[::2], torch.zeros_like(gb[::2])) and gb[1::2].abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_relu_dead_units_pass_no_gradient(backend):
    x, w, b = _lin_tensors()
    b = b - 1000
    _, grads = _compare(
        lambda x, w, b: linear_relu(x, w, b, backend=backend), _stock_linear(True), [x, w, b]
    )
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


# --- batch shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [0, 1], ids=["empty_batch", "batch_of_one"])
def test_conv_batch_size(n, backend):
    out, _ = _compare(*_conv(backend), _conv_tensors(n=n))
    assert out.shape[0] == n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_unbatched(backend):
    x, w, b = _conv_tensors()
    out, _ = _compare(*_conv(backend), [x[0], w, b])
    assert out.dim() == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("fn", "stock"), LINEAR_FNS, ids=LINEAR_IDS)
@pytest.mark.parametrize(
    "batch", [(0,), (1,), (), (2, 3), (0, 4)], ids=["empty", "one", "unbatched", "3d", "3d_empty"]
)
def test_linear_batch_shapes(batch, fn, stock, backend):
    out, _ = _compare(lambda x, w, b: fn(x, w, b, backend=backend), stock, _lin_tensors(batch))
    assert out.shape == (*batch, 5)


# --- magnitudes --------------------------------------------------------------------------------

SCALES = [
    ("input_1e30", 0, 1e30),
    ("input_1e-30", 0, 1e-30),
    ("weight_1e30", 1, 1e30),
    ("weight_1e-30", 1, 1e-30),
    ("bias_1e30", 2, 1e30),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("which", "scale"), [pytest.param(*c[1:], id=c[0]) for c in SCALES])
def test_conv_magnitudes(which, scale, backend):
    """float32 far from 1: no overflow, underflow or loss of relative accuracy (products stay
    within float32's normal range, about 1e-38 to 3e38)."""
    tensors = _conv_tensors()
    tensors[which] = tensors[which] * scale
    out, _ = _compare(*_conv(backend), tensors)
    assert out.isfinite().all() and out.abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("fn", "stock"), LINEAR_FNS, ids=LINEAR_IDS)
@pytest.mark.parametrize(("which", "scale"), [pytest.param(*c[1:], id=c[0]) for c in SCALES])
def test_linear_magnitudes(which, scale, fn, stock, backend):
    tensors = _lin_tensors()
    tensors[which] = tensors[which] * scale
    out, _ = _compare(lambda x, w, b: fn(x, w, b, backend=backend), stock, tensors)
    assert out.isfinite().all() and out.abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_overflow_to_inf(backend):
    """Products beyond float32's range: +Inf where stock float32 has it, and ties between
    +Inf values routed as max_pool2d routes them. The oracle is stock float32 (float64 would
    not overflow)."""
    x = torch.randn(2, 1, 8, 8) * 1e30
    w = torch.randn(3, 1, 1, 1) * 1e10  # 1x1 kernel: each conv output is one product, +/-Inf
    b = torch.randn(3)
    fn, stock = _conv(backend, padding=0)
    grad_out = torch.randn(_stock_conv(x, w, b).shape)
    out, grads = _run(fn, [x, w, b], [True] * 3, grad_out)
    want, want_grads = _run(stock, [x, w, b], [True] * 3, grad_out)
    assert (want == INF).any() and (want == 0).any()
    names = ("output", "grad of input", "grad of weight", "grad of bias")
    _assert_matches(
        dict(zip(names, [out, *grads], strict=True)),
        [dict(zip(names, [want, *want_grads], strict=True))],
        TOL[torch.float32],
    )


# --- layouts -----------------------------------------------------------------------------------

LAYOUTS = ["channels_last", "strided_input", "transposed_hw", "noncontiguous_weight_and_bias"]


def _layout(kind, x, w, b):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), w, b
    if kind == "strided_input":  # every other row and column of a larger tensor
        big = torch.randn(x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3])
        return big[:, :, ::2, ::2], w, b
    if kind == "transposed_hw":
        return x.transpose(2, 3).contiguous().transpose(2, 3), w, b
    wt = torch.randn(w.shape[0], w.shape[1], w.shape[3], w.shape[2]).transpose(2, 3)
    return x, wt, torch.randn(2 * b.shape[0])[::2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_conv_layouts(kind, backend):
    x, w, b = _layout(kind, *_conv_tensors())
    assert not (x.is_contiguous() and w.is_contiguous() and b.is_contiguous())
    _compare(*_conv(backend), [x, w, b])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("fn", "stock"), LINEAR_FNS, ids=LINEAR_IDS)
@pytest.mark.parametrize("kind", ["transposed_input", "strided_input", "transposed_weight"])
def test_linear_layouts(kind, fn, stock, backend):
    x, w, b = _lin_tensors()
    if kind == "transposed_input":
        x = x.t().contiguous().t()
    elif kind == "strided_input":
        x = torch.randn(x.shape[0], 3 * x.shape[1])[:, ::3]
    else:
        w = w.t().contiguous().t()
    _compare(lambda x, w, b: fn(x, w, b, backend=backend), stock, [x, w, b])


# --- requires_grad on every subset ---------------------------------------------------------------

SUBSETS = list(itertools.product([False, True], repeat=3))
SUBSET_IDS = ["".join(n for n, s in zip("xwb", sub, strict=True) if s) or "none" for sub in SUBSETS]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("needs", SUBSETS, ids=SUBSET_IDS)
def test_conv_requires_grad_subsets(needs, backend):
    fn, stock = _conv(backend)
    out, grads = _compare(fn, stock, _conv_tensors(), needs=list(needs))
    assert out.requires_grad == any(needs)
    assert [g is not None for g in grads] == list(needs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("fn", "stock"), LINEAR_FNS, ids=LINEAR_IDS)
@pytest.mark.parametrize("needs", SUBSETS, ids=SUBSET_IDS)
def test_linear_requires_grad_subsets(needs, fn, stock, backend):
    out, grads = _compare(
        lambda x, w, b: fn(x, w, b, backend=backend), stock, _lin_tensors(), needs=list(needs)
    )
    assert out.requires_grad == any(needs)
    assert [g is not None for g in grads] == list(needs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_without_bias(backend):
    x, w, _ = _conv_tensors()
    _compare(*_conv(backend), [x, w, None])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_float64(backend):
    _compare(*_conv(backend), _conv_tensors(dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["conv_relu_pool", "linear_relu"])
def test_create_graph_gives_stock_second_order(op, backend):
    """With create_graph=True (and a grad_out that is itself differentiable) the gradients are
    stock's, and so are the gradients of those gradients, grad_out's included."""
    gen = torch.Generator().manual_seed(3)
    kw = {"dtype": torch.float64, "generator": gen}
    if op == "conv_relu_pool":
        x, w, b = torch.randn(2, 3, 8, 8, **kw), torch.randn(4, 3, 3, 3, **kw), torch.randn(4, **kw)
        fused, stock = conv_relu_pool2d, _stock_conv
    else:
        x, w, b = torch.randn(5, 7, **kw), torch.randn(6, 7, **kw), torch.randn(6, **kw)
        fused, stock = linear_relu, _stock_linear(True)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    want_out = stock(*leaves)
    grad_out = torch.randn(want_out.shape, **kw).requires_grad_()
    second = [*leaves, grad_out]
    results = []
    for out in (fused(*leaves, backend=backend), want_out):
        grads = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        results.append((grads, torch.autograd.grad(penalty, second, allow_unused=True)))
    (got, got2), (want, want2) = results
    for g, ref in zip(got, want, strict=True):
        assert g.requires_grad and rel_err(g, ref) < TOL[torch.float64]
    for t, g, ref in zip(second, got2, want2, strict=True):
        # None: no path to t (the mask and argmax depend on b only piecewise-constantly, and
        # stock's graph may still hold a path that gives zeros)
        g, ref = (torch.zeros_like(t) if v is None else v for v in (g, ref))
        assert rel_err(g, ref) < TOL[torch.float64]
