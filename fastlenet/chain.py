"""A straight chain of fastlenet layers as ONE autograd node (CPU backend).

conv_relu_pool layers, a flatten, then linear(_relu) layers, with dropouts between them --
LeNet-5, the Fashion CNN, a `fastlenet.nn.Sequential` of fastlenet layers, pytorch/examples'
MNIST Net through fastlenet.fuse -- run forward in one C++ call (chain_fwd) and backward in one
(chain_bwd), each calling the per-layer CPU ops (csrc/chain_cpu.cpp): the same kernels on the
same tensors, so the numbers are the per-layer path's, bit for bit. A dropout's noise is drawn
in the forward from the default generator as stock's is (csrc/dropout_cpu.cpp), and saved. The
node is a C++ autograd Function (csrc/chain_autograd_cpu.cpp, `fastlenet::ChainFunction`), so
the backward runs no Python. What goes is the per-layer cost outside the kernels: a Python
autograd.Function, an engine node, the Python argument checks and a Python-to-C++ call per
layer and pass.

`run(layers, x, layered)` takes the chain when nothing a user could observe differs, and calls
`layered(x)` (the per-layer path) otherwise: hooks on a layer, torch.compile or jit tracing,
torch.autocast, a torch.func transform or forward-mode AD, another backend or device, a dtype
other than float32 and float64, a channels_last or non-contiguous input or weight, unbatched
input, padding="same" with an even kernel ("valid", and "same" with an odd one, are numbers on
the chain), a dropout in place, at p=1, first, last or after another (_dropout_p, dropout). The
per-layer checks run on the first call of each shape (a layered forward under no_grad, which
raises what the layers raise; the generator's state is restored after it, so that the dropouts
draw as stock's do); the call then takes the chain, as every later call with that shape does.
"""

import itertools

import torch
from torch import nn
from torch.nn.modules import module as _module

from fastlenet import _ext, backends
from fastlenet._autograd import autocast_any as _autocast_any
from fastlenet._autograd import transforms_active as _transforms_active
from fastlenet._checks import pair, same_padding
from fastlenet.nn.conv_relu_pool import ConvReLUPool2d
from fastlenet.nn.dropout import Dropout
from fastlenet.nn.linear_relu import Linear, LinearReLU

#: Ints per layer in the spec (kChainInts in csrc/chain_ops.h): kind, then conv: stride,
#: padding, pool_size, pool_stride (two each); linear: relu, then zeros.
LAYER_INTS = 9
CONV, LINEAR = 0, 1
_DTYPES = (torch.float32, torch.float64)
_LINEARS = (LinearReLU, Linear)
#: Dropouts a chain runs: fastlenet's draws the same noise as stock's (fastlenet/dropout.py).
_DROPOUTS = (Dropout, nn.Dropout)


def _padding(layer):
    """A conv layer's padding as the chain's ints, or None where it has none: padding="same"
    with an even kernel, which the layer pads by one more row and column at the bottom and
    right (_checks.same_padding's `extra`). "valid" is 0; "same" (stride 1, the layer checks)
    otherwise the `before` the layer pads on each side."""
    padding = layer.padding
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    shape = getattr(layer.weight, "shape", ())
    if padding != "same" or len(shape) != 4:
        return None
    before, extra = same_padding(shape[-2:])
    return None if any(extra) else before


def spec(layers) -> list[int] | None:
    """The chain_fwd spec of `layers` (its dropouts aside: see dropout), or None when they are
    not a chain it runs."""
    out: list[int] = []
    seen_linear = False
    for layer in layers:
        if type(layer) in _DROPOUTS:
            continue
        if type(layer) is ConvReLUPool2d and not seen_linear:
            padding = _padding(layer)
            if padding is None:
                return None
            geometry = (layer.stride, padding, layer.pool_size, layer.pool_stride)
            names = ("stride", "padding", "pool_size", "pool_stride")  # each may be set to an int
            out += [CONV, *(v for g, n in zip(geometry, names, strict=True) for v in pair(g, n))]
        elif type(layer) in _LINEARS:
            seen_linear = True
            out += [LINEAR, int(layer.relu)] + [0] * (LAYER_INTS - 2)
        else:
            return None
    return out or None


def _dropout_p(m) -> float | None:
    """The p dropout module `m` drops out with now: 0.0 where it passes its input (evaluation,
    p = 0); None where the chain does not run it: in place (stock's raises where that changes a
    tensor a backward reads), p = 1 (stock multiplies by zeros without drawing), a p that is not
    a number in [0, 1)."""
    if not m.training:
        return 0.0
    p = m.p
    if m.inplace or type(p) not in (float, int) or not 0 <= p < 1:
        return None
    return float(p)


def dropout(layers) -> list[float] | None:
    """chain_fwd's `dropout` for `layers`: per layer of the spec, the p of the dropout on its
    output; [] where none drops out; None where a dropout cannot run on the chain (_dropout_p)
    or does not sit between two layers, alone (_placed)."""
    if not _placed(layers):
        return None
    out: list[float] = []
    for m in layers:
        if type(m) not in _DROPOUTS:
            out.append(0.0)
            continue
        p = _dropout_p(m)
        if p is None:
            return None
        out[-1] = p
    return out if any(out) else []


def _placed(layers) -> bool:
    """Whether each dropout of `layers` sits between two layers, alone."""
    drops = [type(m) in _DROPOUTS for m in layers]
    return not drops or (
        not drops[0] and not drops[-1] and not any(a and b for a, b in itertools.pairwise(drops))
    )


def hooked(layer) -> bool:
    """Whether `layer` has module hooks (forward, forward pre-, backward or backward pre-)."""
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


#: grad_fn.name() of a tensor the chain computed (csrc/chain_autograd_cpu.cpp's node).
NODE = "torch::autograd::CppNode<fastlenet::ChainFunction>"

_PLAIN = object()  # a parameter name that is not registered
_CPU = torch.device("cpu")

# Calls whose per-layer checks have passed, by key (input and every parameter, with dtype, and
# each layer's kind and geometry): the chain's spec and dropout, or None where the layers are no
# chain.
_CHECKED: dict[tuple, tuple[list[int], list[float]] | None] = {}


def _key(x, layers):
    """(the key of this call, [w0, b0, w1, b1, ...]), or None when it cannot take the chain.
    Runs on every call, so each layer is read once: its kind and geometry go into the key
    (the spec is built once per key; of a dropout, its mode, p and inplace flag), parameters
    are read from `_parameters` (nn.Module's attribute lookup costs ~0.5 us each), and their
    devices, dtypes, contiguity and sizes in one C++ call (chain_signature,
    csrc/chain_key_cpu.cpp). run()'s own time for LeNet-5 (the chain node stubbed out, 2-core
    Zen 4 VM): 8.2 us with the spec built and the key made on every call, 6.0 us with it built
    once per key. This function alone for LeNet-5 (timeit, 2-core Zen 5 VM): 5.5 us with the
    parameters read in Python, 3.2 us with chain_signature."""
    if type(x) is not torch.Tensor or x.dim() != 4 or not x.is_cpu or not x.is_contiguous():
        return None
    dtype = x.dtype
    if dtype not in _DTYPES:
        return None
    key, params = [x.shape, dtype], []
    for layer in layers:
        kind = type(layer)
        if kind is ConvReLUPool2d:
            key += (kind, layer.stride, layer.padding, layer.pool_size, layer.pool_stride)
        elif kind in _LINEARS:
            key += (kind, layer.relu)
        elif kind in _DROPOUTS:
            if hooked(layer):
                return None
            key += (kind, layer.training, layer.p, layer.inplace)
            continue
        else:
            return None
        backend = layer.backend
        if hooked(layer) or (backend != "cpu" and backends.resolve(backend, _CPU) != "cpu"):
            return None
        # A name not registered is a plain attribute: bias=False leaves `bias = None`, and a
        # tensor set after `del layer.weight` (a learned optimiser's fast weights) is one.
        registered = layer._parameters
        weight, bias = registered.get("weight", _PLAIN), registered.get("bias", _PLAIN)
        params += (
            layer.weight if weight is _PLAIN else weight,
            layer.bias if bias is _PLAIN else bias,
        )
    sizes = _ext._C.chain_signature(x, params)
    if sizes is None:
        return None
    key.append(sizes)
    return tuple(key), params


def of_modules(modules) -> list | None:
    """The fastlenet layers and dropouts of `modules` (a Sequential's children) when they form
    a chain the chain path computes exactly -- conv layers, one nn.Flatten() before the first
    linear layer (at the start for an MLP on images), linear layers, a dropout between two
    layers -- else None. Subclasses (which may override forward) are not chained."""
    layers, flattened, linear = [], False, False
    for m in modules:
        kind = type(m)
        if kind is nn.Identity:  # what fuse leaves in a Sequential where a layer was fused
            continue
        if kind is nn.Flatten:
            if flattened or (m.start_dim, m.end_dim) != (1, -1):
                return None
            flattened = True
            continue
        if kind in _DROPOUTS:  # its mode and p: dropout(), at each new key
            layers.append(m)
            continue
        # A linear on a 4-D tensor acts on its last dimension; a conv after a flatten fails.
        fits = flattened if kind in _LINEARS else kind is ConvReLUPool2d and not flattened
        if not fits:
            return None
        layers.append(m)
        linear = linear or kind in _LINEARS
    if flattened and not linear:  # the chain's output would not be flattened
        return None
    n = sum(type(m) not in _DROPOUTS for m in layers)
    return layers if n > 1 and spec(layers) is not None and _placed(layers) else None


def run(layers, x, layered, others=()):
    """layers applied to x as one autograd node when it may, else `layered(x)`. `others`:
    modules of the chain that are not layers (an nn.Flatten), whose hooks must run too."""
    if (
        not _ext.LOADED
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # the layers record their ops, which the trace can hold
        or _autocast_any()  # the layers cast as stock's conv and linear do
        or _transforms_active()  # torch.func, forward AD: the layers run stock's composition
        or _global_hooks()
    ):
        return layered(x)
    for m in others:
        if hooked(m):
            return layered(x)
    keyed = _key(x, layers)
    if keyed is None:
        return layered(x)
    key, params = keyed
    try:
        checked = _CHECKED.get(key, _PLAIN)
    except TypeError:  # geometry set to something unhashable (a list): the layers' checks
        return layered(x)
    if checked is _PLAIN:
        checked = _CHECKED[key] = _check(layers, x, layered)
    if checked is None:
        return layered(x)
    return _ext._C.chain(x, params, *checked)


def _check(layers, x, layered):
    """run()'s (spec, dropout) for a new key, or None where the layers are no chain. The
    layers' own checks and errors, once, by a forward layer by layer that records nothing and
    leaves the generator as it was (the dropouts draw on the call itself). The call then takes
    the path every later call of the key takes: a checkpoint's recomputation
    (torch.utils.checkpoint, non-reentrant) must save what the first forward saved."""
    draws = any(type(m) in _DROPOUTS and m.training for m in layers)
    state = torch.get_rng_state() if draws else None
    try:
        with torch.no_grad():
            out = layered(x)
    finally:
        if state is not None:
            torch.set_rng_state(state)
    # A chain keeps the batch: a forward that does not (a model's x.view(-1, K) where a sample
    # has another number of values than K, fastlenet.fuse's Chain) is no chain.
    keeps = isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == x.shape[0]
    layer_spec, drop = (spec(layers), dropout(layers)) if keeps else (None, None)
    return None if layer_spec is None or drop is None else (layer_spec, drop)


def on_chain(t: torch.Tensor) -> bool:
    """True when `t` is the output of the chain's autograd node."""
    return t.grad_fn is not None and t.grad_fn.name() == NODE


def _unpacked(layer_spec):
    """Per layer of a spec: (CONV, (stride, padding, pool_size, pool_stride)) or (LINEAR, relu)."""
    for i in range(0, len(layer_spec), LAYER_INTS):
        s = layer_spec[i : i + LAYER_INTS]
        yield (CONV, (s[1:3], s[3:5], s[5:7], s[7:9])) if s[0] == CONV else (LINEAR, bool(s[1]))


def layered(layer_spec, input, weights, biases, drop=(), dropped=()):
    """The chain layer by layer through the per-layer Functions (CPU backend); a dropout
    multiplies by its noise in `dropped` (chain_fwd's)."""
    from fastlenet.conv_relu_pool import conv_relu_pool2d
    from fastlenet.linear_relu import linear, linear_relu

    x, noises = input, iter(dropped)
    drop = drop or [0.0] * len(weights)
    for (kind, args), w, b, p in zip(_unpacked(layer_spec), weights, biases, drop, strict=True):
        if kind == CONV:
            x = conv_relu_pool2d(x, w, b, *args, backend="cpu")
        else:
            x = (linear_relu if args else linear)(torch.flatten(x, 1), w, b, backend="cpu")
        if p:
            x = x * next(noises)
            if kind == LINEAR and args:
                next(noises)  # the output before the dropout: the ReLU mask chain_bwd reads
    return x


def _grads_with_graph(layer_spec, grad_out, input, weights, biases, need, drop, dropped):
    """The chain node's backward under create_graph (csrc/chain_autograd_cpu.cpp calls it):
    [input, w0, b0, w1, b1, ...]'s gradients where `need` (in that order) says, else None,
    differentiable again: the forward recomputed layer by layer (whose backward under
    create_graph is the reference's, fastlenet/_autograd.py) and differentiated with a graph,
    so second derivatives reach every intermediate as the per-layer path's do. Each slot gets
    the gradient of its own use: a layer twice in the chain (its Parameters in two slots) has
    each slot differentiated through a view of its own, as chain_bwd gives one per slot, and the
    engine adds the slots' gradients once (differentiating the shared tensor itself would give
    each slot the sum, counted twice)."""
    with torch.enable_grad():
        # Autocast off for the recomputation: the chain's forward ran without it (run()
        # declines it); a backward called under autocast differentiates under it, as stock's.
        with torch.autocast(input.device.type, enabled=False):
            leaves = [input, *(t for pair in zip(weights, biases, strict=True) for t in pair)]
            leaves = [t.view_as(t) if t is not None else None for t in leaves]
            input, weights, biases = leaves[0], leaves[1::2], leaves[2::2]
            wanted = [t for t, n in zip(leaves, need, strict=True) if n]
            out = layered(layer_spec, input, weights, biases, drop, dropped)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return [next(grads) if n else None for n in need]


def fwd_fake(input, weights, biases, layer_spec, drop):
    from fastlenet.conv_relu_pool import fwd_fake as conv_fake

    activations, argmaxes, dropped = [], [], []
    x = input
    drop = drop or [0.0] * len(weights)
    for i, ((kind, args), w) in enumerate(zip(_unpacked(layer_spec), weights, strict=True)):
        if i > 0:
            activations.append(x)
        if kind == CONV:
            x, argmax = conv_fake(x, w, biases[i], *args)
            argmaxes.append(argmax)
        else:
            x = x.new_empty(x.shape[0], w.shape[0])
        if drop[i]:
            dropped.append(torch.empty_like(x))
            if kind == LINEAR and args:
                dropped.append(torch.empty_like(x))
            x = torch.empty_like(x)
    return x, activations, argmaxes, dropped


def bwd_fake(
    grad_out, input, out, activations, argmax, dropped, weights, layer_spec, drop, input_grad
):
    grads = [input.new_empty(input.shape if input_grad else (0,))]
    for w in weights:
        grads += [w.new_empty(w.shape), w.new_empty(w.shape[:1])]
    return grads


if _ext.LOADED:
    torch.library.register_fake("fastlenet::chain_fwd", fwd_fake)
    torch.library.register_fake("fastlenet::chain_bwd", bwd_fake)
