"""fuse(model): fastlenet's fused ops in a model written with stock layers, and the same rewrite
as a torch.compile backend ("fastlenet").

Patterns, in modules (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear) or functional calls
(F.conv2d, F.relu / torch.relu / .relu() / inplace variants, F.max_pool2d, F.linear):
    conv2d -> ReLU -> max_pool2d   and   conv2d -> max_pool2d -> ReLU   (ReLU and max commute)
    conv2d -> ReLU                 (the fused op with pool_size=1)
    linear -> ReLU
A match is fused only when it is exactly the fused op (dilation 1, groups 1, zero padding mode;
pool without padding or dilation, floor mode, no indices, at most 255 window positions), its
intermediate tensors feed nothing else, and its modules are the stock classes themselves
without hooks (a subclass's forward -- torch.ao's QAT layers, a parametrized weight -- and hooks
-- prune's, the old weight_norm's -- would be lost with the module). Everything else is left as
it was, with the reason in the report. A module called at more than one site is fused by calls
of fastlenet's functions on its Parameters and stays itself for its other calls; arguments that
are the training flag (F.dropout(x, training=self.training)) read the fused model's flag at
each call. fuse() also
swaps dropout (nn.Dropout, F.dropout) for fastlenet's, which draws the same noise from the same
generator, faster (fastlenet/dropout.py); a dropout module between two layers of a chain runs in
the chain (fastlenet/chain.py). The compile backend leaves dropout to Inductor.
"""

import collections
import copy
import dataclasses
import inspect
import logging
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastlenet import backends, chain
from fastlenet._checks import MAX_POOL_WINDOW
from fastlenet.conv_relu_pool import conv_relu_pool2d
from fastlenet.dropout import dropout
from fastlenet.linear_relu import linear_relu
from fastlenet.nn import Chain, ConvReLUPool2d, Dropout, Linear, LinearReLU
from fastlenet.nn.sequential import FusedSequential

log = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_CONV_FUNCTIONS = (F.conv2d,)  # torch.conv2d is F.conv2d
_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
_LINEAR_FUNCTIONS = (F.linear,)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_POOL_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
_LINEAR_ARGS = ("input", "weight", "bias")
_LINEAR_LAYERS = (LinearReLU, Linear)  # fastlenet layers a chain may hold
_MODULE_KINDS = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear)  # modules a pattern may hold


@dataclasses.dataclass
class FuseReport:
    """What fuse() did: `fused` and `left` hold one line per layer, `dropouts` one per dropout
    swapped for fastlenet's; `traced` is False when the model could not be traced with torch.fx
    and only nn.Sequential containers and nn.Dropout modules were searched."""

    traced: bool = True
    fused: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    note: str = ""
    chains: list = dataclasses.field(default_factory=list)  # runs made one autograd node
    dropouts: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastlenet.fuse: {len(self.fused)} fused, {len(self.left)} left alone"]
        if self.note:
            lines.append(f"  {self.note}")
        lines += [f"  fused: {line}" for line in self.fused]
        lines += [f"  chain: {line}" for line in self.chains]
        lines += [f"  dropout: {line}" for line in self.dropouts]
        lines += [f"  left:  {line}" for line in self.left]
        return "\n".join(lines)


#: torch.fx.graph_module's key for the attributes a GraphModule's deepcopy sets again
#: (torch.ao.quantization's preserved_attributes use it).
_PRESERVED_ATTRIBUTES = getattr(
    torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes"
)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _bind(node, names, defaults):
    """The call's arguments by name (positional and keyword), defaults filled in."""
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


@dataclasses.dataclass
class _Call:
    """One conv, pool, linear or ReLU node, with what the fused op needs to know of it."""

    kind: str
    node: fx.Node
    input: fx.Node
    args: dict
    module: nn.Module | None = None
    problem: str = ""  # why this node cannot be part of a fused op


def _module_problem(module) -> str:
    """Why a conv, ReLU, pool or linear module cannot be replaced (its call fused), or "": a
    subclass may compute something else (QAT's fake-quantising Conv2d, a parametrized weight's
    generated class), and hooks (prune's and weight_norm's forward pre-hooks among them) would
    be dropped with the module."""
    kind = next(c for c in _MODULE_KINDS if isinstance(module, c))
    if type(module) is not kind:
        cls = type(module)
        return f"{cls.__module__}.{cls.__qualname__} is a subclass of nn.{kind.__name__}"
    if chain.hooked(module):
        return "it has hooks"
    return ""


def _classify(node, modules) -> _Call | None:
    if node.op == "call_module":
        module = modules.get(node.target)
        if not isinstance(module, _MODULE_KINDS):
            return None
        problem = _module_problem(module)
        if isinstance(module, nn.Conv2d):
            call = _conv_call(node, _input(node), _module_conv(module), module)
        elif isinstance(module, nn.ReLU):
            call = _Call("relu", node, _input(node), {})
        elif isinstance(module, nn.MaxPool2d):
            call = _pool_call(node, _input(node), _module_pool(module))
        else:
            call = _Call("linear", node, _input(node), {}, module)
        call.problem = ", ".join(p for p in (problem, call.problem) if p)
        return call
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return _Call("relu", node, _input(node), {})
        if node.target in _CONV_FUNCTIONS:
            conv = _bind(node, _CONV_ARGS, {"bias": None, "stride": 1, "padding": 0})
            conv.setdefault("dilation", 1)
            conv.setdefault("groups", 1)
            conv["padding_mode"] = "zeros"
            return _conv_call(node, conv.pop("input"), conv, None)
        if node.target in _POOL_FUNCTIONS:
            defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
            pool = _bind(node, _POOL_ARGS, {**defaults, "return_indices": False})
            return _pool_call(node, pool.pop("input"), pool)
        if node.target in _LINEAR_FUNCTIONS:
            lin = _bind(node, _LINEAR_ARGS, {"bias": None})
            return _Call("linear", node, lin.pop("input"), lin)
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _Call("relu", node, _input(node), {})
    return None


def _input(node):
    """A call's first argument (its input), positional or by name."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _conv_call(node, input, conv, module) -> _Call:
    problems = []
    if _pair(conv["dilation"]) != (1, 1):
        problems.append(f"dilation {conv['dilation']}")
    if conv["groups"] != 1:
        problems.append(f"groups {conv['groups']}")
    if conv["padding_mode"] != "zeros":
        problems.append(f"padding_mode {conv['padding_mode']!r}")
    return _Call("conv", node, input, conv, module, ", ".join(problems))


def _pool_call(node, input, pool) -> _Call:
    problems = []
    if _pair(pool["padding"]) != (0, 0):
        problems.append(f"padding {pool['padding']}")
    if _pair(pool["dilation"]) != (1, 1):
        problems.append(f"dilation {pool['dilation']}")
    if pool["ceil_mode"]:
        problems.append("ceil_mode=True")
    if pool["return_indices"]:
        problems.append("return_indices=True")
    size = _pair(pool["kernel_size"])
    if size[0] * size[1] > MAX_POOL_WINDOW:
        problems.append(f"a window of {size[0] * size[1]} positions (at most {MAX_POOL_WINDOW})")
    return _Call("pool", node, input, pool, problem=", ".join(problems))


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _follow(call, modules, kind):
    """The node after `call` when it is its only user and of `kind` (and fusable), else None."""
    user = _sole_user(call.node)
    nxt = None if user is None else _classify(user, modules)
    if nxt is None or nxt.kind != kind or nxt.input is not call.node or nxt.problem:
        return None
    return nxt


def _name(call) -> str:
    return str(call.node.target) if call.node.op == "call_module" else call.node.name


def _conv_chain(conv, modules):
    """(pool or None, the chain's last call) after `conv`: ReLU then pool, pool then ReLU, or
    ReLU alone; or the reason why there is none."""
    relu = _follow(conv, modules, "relu")
    if relu is not None:
        pool = _follow(relu, modules, "pool")
        return pool, pool or relu
    pool = _follow(conv, modules, "pool")
    if pool is not None:
        relu = _follow(pool, modules, "relu")
        if relu is not None:
            return pool, relu
    if len(conv.node.users) > 1:
        return f"its output feeds {len(conv.node.users)} nodes"
    return "not followed by a ReLU that only it feeds"


def rewrite(gm: fx.GraphModule, backend: str = "auto", functional: bool = False) -> FuseReport:
    """Fuses the patterns of `gm`'s graph in place. Matched modules are replaced by fastlenet's
    layers holding the same Parameter objects (same state_dict keys); with `functional`, or for
    functional calls, by calls of fastlenet's functions."""
    backends.check_choice(backend)
    report = FuseReport()
    modules = dict(gm.named_modules())
    # A module called at more than one site is fused by calls of fastlenet's functions on its
    # Parameters: replacing the module would change what its other calls compute.
    sites = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:  # erased by an earlier match
            continue
        call = _classify(node, modules)
        if call is None or call.kind not in ("conv", "linear"):
            continue
        shared = functional or sites[node.target] > 1
        if call.problem:
            report.left.append(f"{_name(call)}: {call.problem}")
            continue
        if call.kind == "conv":
            chain = _conv_chain(call, modules)
            if isinstance(chain, str):
                report.left.append(f"{_name(call)}: {chain}")
                continue
            pool, last = chain
            _fuse_conv(gm, call, pool, last, backend, shared)
            what = "conv2d -> ReLU -> max_pool2d" if pool else "conv2d -> ReLU"
        else:
            relu = _follow(call, modules, "relu")
            if relu is None:
                report.left.append(f"{_name(call)}: not followed by a ReLU that only it feeds")
                continue
            _fuse_linear(gm, call, relu, backend, shared)
            what = "linear -> ReLU"
        report.fused.append(f"{_name(call)}: {what}")
    # No eliminate_dead_code: an unused in-place call (x.relu_()) would count as dead.
    gm.graph.lint()
    gm.recompile()
    return report


def _replace(gm, first, last, target, args, kwargs, op="call_function"):
    """A new node computing `last`'s value from `first`'s input; the old nodes go."""
    graph = gm.graph
    with graph.inserting_after(last):
        new = graph.create_node(op, target, args, kwargs)
    last.replace_all_uses_with(new)
    doomed = [last]
    while doomed[-1] is not first:
        doomed.append(_input(doomed[-1]))
    for node in doomed:
        graph.erase_node(node)
    return new


def _fuse_conv(gm, conv, pool, last, backend, functional):
    a = conv.args
    pool_size, pool_stride = (
        _pool_window(pool.args["kernel_size"], pool.args["stride"]) if pool else ((1, 1), (1, 1))
    )
    if conv.module is not None and not functional:
        gm.add_submodule(
            conv.node.target, _conv_layer(conv.module, pool_size, pool_stride, backend)
        )
        _replace(gm, conv.node, last.node, conv.node.target, (conv.input,), {}, "call_module")
        return
    weight, bias = _params(gm, conv)
    kwargs = {"backend": backend}
    geometry = (_pair(a["stride"]), a["padding"], pool_size, pool_stride)
    _replace(
        gm, conv.node, last.node, conv_relu_pool2d, (conv.input, weight, bias, *geometry), kwargs
    )


def _fuse_linear(gm, lin, last, backend, functional):
    if lin.module is not None and not functional:
        gm.add_submodule(lin.node.target, _linear_layer(lin.module, backend))
        _replace(gm, lin.node, last.node, lin.node.target, (lin.input,), {}, "call_module")
        return
    weight, bias = _params(gm, lin)
    _replace(gm, lin.node, last.node, linear_relu, (lin.input, weight, bias), {"backend": backend})


def _params(gm, call):
    """Graph values of a call's weight and bias (get_attr nodes for a module's parameters)."""
    if call.module is None:
        return call.args["weight"], call.args.get("bias")
    with gm.graph.inserting_before(call.node):
        weight = gm.graph.get_attr(f"{call.node.target}.weight")
        bias = None
        if call.module.bias is not None:
            bias = gm.graph.get_attr(f"{call.node.target}.bias")
    return weight, bias


_SEQUENTIAL_PATTERNS = (
    ((nn.Conv2d, nn.ReLU, nn.MaxPool2d), "conv2d -> ReLU -> max_pool2d"),
    ((nn.Conv2d, nn.MaxPool2d, nn.ReLU), "conv2d -> ReLU -> max_pool2d"),
    ((nn.Conv2d, nn.ReLU), "conv2d -> ReLU"),
    ((nn.Linear, nn.ReLU), "linear -> ReLU"),
)


def _fuse_sequentials(model, backend, report):
    """Module-level fallback: runs of layers inside nn.Sequential containers (exactly: a
    subclass may override forward). The container keeps its stock children (indexing and
    iteration give them, as the model's code may run them one by one; its state_dict keys),
    and becomes a FusedSequential whose forward runs the fused layers on their Parameters."""
    for name, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        layers, parts, i = list(seq), [], 0
        while i < len(layers):
            fused, size = None, 1
            for types, what in _SEQUENTIAL_PATTERNS:
                run = layers[i : i + len(types)]
                if len(run) == len(types) and all(map(isinstance, run, types)):
                    fused = _fused_layer(run, backend)
                    if isinstance(fused, str):  # a module's problem: no pattern takes it
                        report.left.append(f"{name}.{i}: {fused}")
                        fused = None
                        break
                    if fused is not None:
                        report.fused.append(f"{name}.{i}: {what}")
                        size = len(types)
                        break
            parts.append(fused if fused is not None else layers[i])
            i += size
        if len(parts) == len(layers):  # nothing fused here
            continue
        end = len(parts) - 1
        if type(parts[end]) is nn.Linear and not chain.hooked(parts[end]):  # may end a chain
            parts[end] = _linear_stand_in(parts[end], backend)
        seq.__class__ = FusedSequential
        seq.fuse(parts)
        if chain.of_modules(parts) is not None:
            report.chains.append(f"{name or 'model'} -> one autograd node (FusedSequential)")


def _fused_layer(run, backend):
    """The fused layer for a run of modules matching a pattern, None where its geometry is not
    the fused op's, or the reason why a module of it cannot be replaced."""
    problems = [p for p in map(_module_problem, run) if p]
    if problems:
        return ", ".join(problems)
    first = run[0]
    if isinstance(first, nn.Linear):
        return _linear_layer(first, backend)
    if _conv_call(None, None, _module_conv(first), first).problem:
        return None
    pool = next((m for m in run if isinstance(m, nn.MaxPool2d)), None)
    if pool is None:
        return _conv_layer(first, (1, 1), (1, 1), backend)
    if _pool_call(None, None, _module_pool(pool)).problem:
        return None
    return _conv_layer(first, *_pool_window(pool.kernel_size, pool.stride), backend)


def _module_conv(conv):
    """What _conv_call reads of an nn.Conv2d."""
    keys = ("stride", "padding", "dilation", "groups", "padding_mode")
    return {k: getattr(conv, k) for k in keys}


def _module_pool(pool):
    """What _pool_call reads of an nn.MaxPool2d."""
    return {k: getattr(pool, k) for k in _POOL_ARGS[1:]}


def _pool_window(kernel_size, stride):
    """(pool_size, pool_stride) as pairs; a stride of None or () is the window's size, as in
    max_pool2d."""
    size = _pair(kernel_size)
    # torch.max_pool2d's own default stride is [] (F.max_pool2d's None).
    return size, size if stride is None or (
        isinstance(stride, (tuple, list)) and not stride
    ) else _pair(stride)


def _conv_layer(conv, pool_size, pool_stride, backend):
    """A ConvReLUPool2d holding `conv`'s Parameter objects (not copies)."""
    m = conv
    layer = ConvReLUPool2d(
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.bias is not None,
        pool_size,
        pool_stride,
        backend=backend,
        device="meta",
    )
    layer.weight, layer.bias = m.weight, m.bias
    return layer.train(m.training)


def _linear_layer(linear, backend, cls=LinearReLU):
    """A LinearReLU (or `cls`) holding `linear`'s Parameter objects (not copies)."""
    m = linear
    layer = cls(m.in_features, m.out_features, m.bias is not None, backend=backend, device="meta")
    layer.weight, layer.bias = m.weight, m.bias
    return layer.train(m.training)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping fastlenet's layers whole as it keeps torch.nn's: in a model
    that already holds some, their calls stay module calls (their hooks, and the chains
    _chain_runs makes of them)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = type(m) in (ConvReLUPool2d, *_LINEAR_LAYERS, Dropout)
        return leaf or super().is_leaf_module(m, module_qualified_name)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace(model) with _Tracer."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx's trace of `model`. A forward that reads self.training traces to constants
    fixed at the mode it was traced in, where .train() and .eval() would no longer reach them:
    the model is traced in both modes, and where the traces differ only by arguments that are
    the flag in each (F.dropout(x, training=self.training)), those read the graph module's
    own flag at each call; any other difference raises."""
    defaults = [
        name for name, p in inspect.signature(model.forward).parameters.items() if p.default is None
    ]
    if defaults:  # fx would take `arg is not None` as true for every call
        raise RuntimeError(f"forward's argument {defaults[0]!r} defaults to None")
    gm = _symbolic_trace(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other = _symbolic_trace(model)
    finally:
        for m, mode in modes:
            m.training = mode
    if other.code != gm.code:
        _read_training_flag(gm, other, model.training)
    return gm


def _same(a, b) -> bool:
    """Whether two arguments of nodes of two traces are the same (nodes by name)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _read_training_flag(gm: fx.GraphModule, other: fx.GraphModule, mode: bool) -> None:
    """gm (traced in `mode`) with each argument that is `mode` there and `not mode` in `other`
    (traced in the other mode) read from gm.training instead; raises where the traces differ
    otherwise (control flow on the flag)."""
    nodes, others = list(gm.graph.nodes), list(other.graph.nodes)
    differs = RuntimeError("its forward differs between training and eval mode")
    if len(nodes) != len(others):
        raise differs
    flag = None
    for a, b in zip(nodes, others, strict=True):
        if (a.op, a.target, a.name, len(a.args)) != (b.op, b.target, b.name, len(b.args)):
            raise differs
        if a.kwargs.keys() != b.kwargs.keys():
            raise differs
        pairs = [*zip(a.args, b.args, strict=True), *((a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
        flips = [x is mode and y is (not mode) for x, y in pairs]
        if not all(flip or _same(x, y) for flip, (x, y) in zip(flips, pairs, strict=True)):
            raise differs
        if not any(flips):
            continue
        if flag is None:
            with gm.graph.inserting_before(a), warnings.catch_warnings():
                # torch.fx warns of a get_attr of something not a module, parameter or buffer.
                warnings.simplefilter("ignore", UserWarning)
                flag = gm.graph.get_attr("training")
        args = [flag if f else x for f, x in zip(flips, a.args, strict=False)]
        kw_flips = flips[len(a.args) :]
        kwargs = {k: flag if f else v for f, (k, v) in zip(kw_flips, a.kwargs.items(), strict=True)}
        a.args, a.kwargs = tuple(args), kwargs
    gm.recompile()


def _linear_stand_in(linear, backend):
    """A fastlenet Linear computing what the stock `linear` computes, on its Parameters now and
    later: the two share one `_parameters` dict, so a Parameter assigned to `linear` since
    (load_state_dict(assign=True), to_empty from the meta device) is the one it reads."""
    layer = _linear_layer(linear, backend, Linear)
    layer._parameters = linear._parameters
    return layer


def fuse(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """A module computing the same function as `model` with fastlenet's fused ops wherever they
    compute exactly the same thing. Its modules are copies of `model`'s sharing its Parameter
    and buffer objects (an optimizer built on `model` keeps working; each module keeps its own
    mode and hooks) and it has `model`'s state_dict keys; `model` itself is not changed.
    What was fused and what was left alone, and why, is in the returned module's
    `fuse_report` (a FuseReport) and logged at INFO level by the "fastlenet.fuse" logger."""
    backends.check_choice(backend)
    # The fused model's modules are copies of the model's, sharing its Parameters and buffers:
    # each keeps its own training flag (a frozen BatchNorm in eval, MC dropout in training) and
    # its own hooks, and neither model's .train() / .eval() or new hooks reach the other.
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copied = copy.deepcopy(model, memo=shared)
    try:
        gm = _trace(copied)
    except Exception as exc:  # data-dependent control flow, untraceable calls, ...
        fused = copied
        note = f"torch.fx could not trace the model ({exc}); only nn.Sequential was searched"
        report = FuseReport(traced=False, note=note)
        # Dropouts first: a FusedSequential's parts must be the modules registered (whose
        # training flag .eval() reaches).
        _swap_dropout_modules(fused, report)
        _fuse_sequentials(fused, backend, report)
    else:
        report = rewrite(gm, backend)
        _swap_dropout_calls(gm, report)  # first: a chain holds the dropout modules registered
        _chain_runs(gm, report, backend)
        fused = gm
        fused.training = model.training  # the graph module's own flag; its children keep theirs
        # A GraphModule's deepcopy (swa_utils.AveragedModel's, an EMA copy's) rebuilds it from
        # its graph and keeps of its own attributes only those listed in this meta entry.
        fused.meta.setdefault(_PRESERVED_ATTRIBUTES, {})["fuse_report"] = report
    fused.fuse_report = report
    log.info("%s", report)
    return fused


def _swapped_dropout(module):
    """fastlenet.nn.Dropout for an nn.Dropout (exactly: a subclass may override forward)."""
    swapped = Dropout(module.p, module.inplace)
    swapped.train(module.training)
    return swapped


def _swap_dropout_modules(model, report):
    """Each nn.Dropout of `model`, a deep copy of the user's model, becomes fastlenet's."""
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, child_name, _swapped_dropout(child))
                report.dropouts.append(f"{name}.{child_name}" if name else child_name)


def _swap_dropout_calls(gm, report):
    """The traced graph's dropouts call fastlenet's: nn.Dropout modules it calls (set in the
    GraphModule's own containers: a torch.nn layer fx keeps whole, holding dropouts of its own,
    is the user's module and stays as it is) and F.dropout calls (the same signature)."""
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(module) is nn.Dropout:
            gm.add_submodule(node.target, _swapped_dropout(module))  # as _fuse_conv replaces
            report.dropouts.append(node.target)
        elif node.op == "call_function" and node.target is F.dropout:
            node.target = dropout
            report.dropouts.append(node.name)
    gm.recompile()


def _flatten_module(node, modules):
    """An nn.Flatten() standing for `node` when it is torch.flatten(x, 1) in any spelling."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return m if type(m) is nn.Flatten else None
    args = {**dict(zip(("input", "start_dim", "end_dim"), node.args, strict=False)), **node.kwargs}
    is_call = node.op == "call_function" and node.target is torch.flatten
    is_method = node.op == "call_method" and node.target == "flatten"
    dims = (args.get("start_dim", 0), args.get("end_dim", -1))
    return nn.Flatten() if (is_call or is_method) and dims == (1, -1) else None


def _batch_size(node, x):
    """The nodes of `x.size(0)`, `x.shape[0]` or `x.size()[0]` ending in `node` (each read
    only there), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size" and node.args == (x, 0):
        return [node]
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1:] != (0,):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    size = src.op == "call_method" and src.target == "size" and src.args == (x,)
    shape = src.op == "call_function" and src.target is getattr and src.args == (x, "shape")
    return [src, node] if (size or shape) and not src.kwargs and len(src.users) == 1 else None


def _reads_batch_size(node, x) -> bool:
    """Whether `node` is one of _batch_size's nodes for x (x.size() and x.shape come first)."""
    users = list(node.users)
    return _batch_size(node, x) is not None or (
        len(users) == 1 and _batch_size(users[0], x) is not None
    )


def _reshape_flatten(node, x):
    """(how, probes) when `node` reshapes x to its flattened samples -- x.view / x.reshape /
    torch.reshape to (x.size(0), -1) (probes: the nodes reading the batch size), or to (-1, K)
    -- where how = (method, K or None) is what Chain runs in the layer path; else None. (-1, K)
    flattens only where a sample has K values: chain.run checks that the batch is kept."""
    if node.op == "call_method" and node.target in ("view", "reshape") and not node.kwargs:
        method, dims = node.target, node.args[1:]
    elif node.op == "call_function" and node.target is torch.reshape and not node.kwargs:
        method, dims = "reshape", node.args[1:]
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    if _input(node) is not x or len(dims) != 2:
        return None
    first, second = dims
    if second == -1:
        probes = _batch_size(first, x)
        ok = probes is not None and len(probes[-1].users) == 1
        return ((method, None), probes) if ok else None
    if first == -1 and type(second) is int and second > 0:
        return (method, second), []
    return None


def _chain_runs(gm, report, backend) -> None:
    """Each straight run of fused layers, a flatten and dropout modules (every output feeding
    only the next; the flatten in any spelling _flatten_module or _reshape_flatten knows) that
    fastlenet.chain can run becomes one Chain module call: one autograd node for the run (its
    layers stay registered where they were: state_dict and hooks are unchanged)."""
    modules = dict(gm.named_modules())
    runs, current = [], []
    # x.view(x.size(0), -1) and its like: the nodes reading the batch size, by the reshape
    # they feed; `reshapes`: per reshape node, what Chain runs for it in the layer path.
    probes, reshapes = {}, {}
    for node in gm.graph.nodes:
        prev = current[-1][0] if current else None
        if prev is not None and _reads_batch_size(node, prev):
            continue  # read by the reshape after it, or the run ends there
        module = modules.get(node.target) if node.op == "call_module" else None
        layer = module if type(module) in (ConvReLUPool2d, *_LINEAR_LAYERS) else None
        # A dropout module inside a run (not first: it cannot start one; not last: see below).
        drop = module if type(module) is Dropout and current else None
        part = layer or drop or _flatten_module(node, modules)
        source = _input(node)
        reshape = _reshape_flatten(node, source) if part is None and source is not None else None
        if reshape is not None:
            part, (reshapes[node], probes[node]) = nn.Flatten(), reshape
        users = set(prev.users) - set(probes.get(node, ())) if prev is not None else set()
        follows = prev is not None and source is prev and users == {node}
        if part is None and follows and type(module) is nn.Linear and not chain.hooked(module):
            part = _linear_stand_in(module, backend)  # a last linear, no ReLU
        if part is not None and follows:
            current.append((node, part, module))
            continue
        runs.append(current)
        starts = layer is not None or type(part) is nn.Flatten  # (an MLP on images)
        current = [(node, part, module)] if starts else []
    runs.append(current)
    for k, run in enumerate(r for r in runs if r):
        # A trailing flatten or dropout stays as it was; a stock linear only ends a chain.
        while run and type(run[-1][1]) in (nn.Flatten, Dropout):
            run.pop()
        end = next((i for i, (_, _, m) in enumerate(run) if type(m) is nn.Linear), None)
        if end is not None:
            del run[end + 1 :]
        if chain.of_modules([part for _, part, _ in run]) is None:
            continue
        first, last = run[0][0], run[-1][0]
        name = f"fastlenet_chain{k}"
        # The stock linear stays the module the user sees (gm's): the graph passes it to the
        # chain at each call, which runs it itself where it was swapped or hooked since.
        stand_in = [m if i == end else None for i, (_, _, m) in enumerate(run)]
        how = [reshapes.get(node) for node, _, _ in run]
        gm.add_submodule(name, Chain([part for _, part, _ in run], stand_in, how))
        current, at = [], last
        if end is not None:
            with gm.graph.inserting_after(last):
                at = gm.graph.get_attr(run[end][0].target)
            current.append(at)
        with gm.graph.inserting_after(at):
            call = gm.graph.call_module(name, (_input(first), *current))
        last.replace_all_uses_with(call)
        for node, _, _ in reversed(run):
            gm.graph.erase_node(node)
            for probe in reversed(probes.get(node, ())):
                gm.graph.erase_node(probe)
        names = [n.target if n.op == "call_module" else n.name for n, _, _ in run]
        report.chains.append(f"{', '.join(names)} -> one autograd node ({name})")
        if end is not None:  # the stock linear runs in the chain now (its line says so)
            left = f"{run[end][0].target}:"
            report.left = [line for line in report.left if not line.startswith(left)]
    gm.recompile()


def compile_backend(gm: fx.GraphModule, example_inputs):
    """torch.compile(model, backend="fastlenet"): the rewrite on the graph Dynamo captured (its
    parameters are graph inputs: functional calls), then Inductor compiles the result.
    Registered through the torch_dynamo_backends entry point (setup.py)."""
    report = rewrite(gm, functional=True)
    log.info("%s", report)
    # lookup_backend: how the torch.compiler custom-backend guide composes backends.
    return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)


__all__ = ["FuseReport", "compile_backend", "fuse", "rewrite"]
