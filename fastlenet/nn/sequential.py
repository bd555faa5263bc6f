"""Sequential and Chain: a chain of fastlenet layers run as one autograd node."""

from torch import nn


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
    them registered under their own names, so its state_dict and hooks are unchanged."""

    def __init__(self, parts, watch=()):
        super().__init__()
        # Tuples of modules are not registered by nn.Module.
        self.parts = tuple(parts)
        # Modules the user sees in place of a part (a stock nn.Linear whose Parameters a part
        # shares): their hooks send the call through them, layer by layer.
        self.watch = tuple(watch)

    def forward(self, input):
        from fastlenet import chain

        layers = [m for m in self.parts if type(m) is not nn.Flatten]
        others = [m for m in self.parts if type(m) is nn.Flatten] + list(self.watch)
        return chain.run(layers, input, self._layered, others=others)

    def _layered(self, x):
        watched = {id(m.weight): m for m in self.watch}
        for m in self.parts:
            x = watched.get(id(getattr(m, "weight", None)), m)(x)
        return x

    def extra_repr(self) -> str:
        return "parts=" + ", ".join(type(m).__name__ for m in self.parts)
