"""Sequential and Chain: a chain of fastlenet layers run as one autograd node."""

import torch
from torch import fx, nn


class Sequential(nn.Sequential):
    """nn.Sequential (same constructor, children and state_dict keys). When its children are
    a chain -- ConvReLUPool2d layers, one nn.Flatten(), LinearReLU / Linear layers -- the
    forward runs as one autograd node with one C++ call each way (fastlenet/chain.py),
    computing exactly what the children compute one by one; otherwise, and wherever the
    chain would differ (hooks, devices, layouts), it is nn.Sequential's forward."""

    def forward(self, input):
        from fastlenet import chain

        children = list(self._modules.values())
        layers = chain.of_modules(children)
        if layers is None:
            return super().forward(input)
        # The children that are not layers run inside the chain too: their hooks count.
        others = [m for m in children if type(m) in (nn.Flatten, nn.Identity)]
        return chain.run(layers, input, super().forward, others=others)


class Chain(nn.Module):
    """What fastlenet.fuse puts in place of a chain it found in a traced model: `parts` (the
    layers and the nn.Flatten, in order) are held, not registered -- the graph module keeps
    them registered under their own names, so its state_dict and hooks are unchanged.

    `stand_in[i]`, where not None, is the stock module the user sees in place of part i (a
    last nn.Linear, which part i runs on fastlenet's kernels through the same Parameters). The
    graph passes the modules registered under those names at each call (`current`): one that
    is no longer the module fused, or that has hooks now, sends the call layer by layer
    through the modules the user has.

    `reshapes[i]`, where not None, is how the model flattened where part i (an nn.Flatten)
    stands: (method, K) for x.view / x.reshape ("view", "reshape") to (x.size(0), -1) where K
    is None, else to (-1, K). The layer path runs that call itself (a view of a non-contiguous
    tensor raises as the model's did); the chain flattens, where chain.run found that the call
    keeps the batch."""

    def __init__(self, parts, stand_in=None, reshapes=None):
        super().__init__()
        # Tuples of modules are not registered by nn.Module.
        self.parts = tuple(parts)
        self.stand_in = tuple(stand_in) if stand_in is not None else (None,) * len(self.parts)
        self.reshapes = tuple(reshapes) if reshapes is not None else (None,) * len(self.parts)
        # What every call reads, from the two above: the layers chain.run gets, the flattens
        # whose hooks count, the stock modules the graph passes.
        self._layers = [m for m in self.parts if type(m) is not nn.Flatten]
        self._flattens = [m for m in self.parts if type(m) is nn.Flatten]
        self._stand_ins = tuple(m for m in self.stand_in if m is not None)

    def forward(self, input, *current):
        from fastlenet import chain

        if any(c is not m for c, m in zip(current, self._stand_ins, strict=True)):
            return self._layered(input, current)
        others = self._flattens + list(current)
        return chain.run(self._layers, input, lambda x: self._layered(x, current), others=others)

    def _layered(self, x, current):
        current = iter(current)
        traced = isinstance(x, fx.Proxy)
        for part, stock, how in zip(self.parts, self.stand_in, self.reshapes, strict=True):
            if how is not None:
                method, features = how
                shape = (x.size(0), -1) if features is None else (-1, features)
                x = x.reshape(shape) if method == "reshape" else x.view(shape)
                continue
            if traced and type(part) is nn.Flatten:  # a part fx may not find registered
                x = torch.flatten(x, part.start_dim, part.end_dim)
                continue
            x = (part if stock is None else next(current))(x)
        return x

    def extra_repr(self) -> str:
        return "parts=" + ", ".join(type(m).__name__ for m in self.parts)


class FusedSequential(nn.Sequential):
    """What fastlenet.fuse makes of an nn.Sequential in a model torch.fx cannot trace: its
    children stay the stock modules (indexing, iteration and the state_dict give them, as the
    model's own code may run them one by one), and its forward runs `fused` instead: a Chain of
    the fused layers (the same Parameters) and the children no pattern took, one autograd node
    where they form a chain."""

    def fuse(self, parts):
        # Not registered (object.__setattr__): the Sequential's children stay its own.
        object.__setattr__(self, "fused", Chain(parts))

    def forward(self, input):
        return self.fused(input)
