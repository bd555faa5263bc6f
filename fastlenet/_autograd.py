"""What the fused ops' autograd Functions share."""

import torch
import torch.autograd.forward_ad as _forward_ad

from fastlenet import backends

# Names the ops' CPU fast paths (conv_relu_pool2d, linear_relu, linear) read on every call,
# bound once and imported as module globals: each `torch.x` lookup costs tens of ns per call.
CPU = torch.device("cpu")
Tensor = torch.Tensor
RESOLVED = backends._RESOLVED  # resolve()'s cache; refresh() clears it in place
is_compiling = torch.compiler.is_compiling

# The device types whose torch.autocast state the ops follow.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) or forward-mode AD (a dual
    level of torch.autograd.forward_ad) is active: the ops then run the reference's composition,
    stock's own ops, which every transform knows (the Functions and C++ nodes here define no
    vmap or jvp rule: a dual input's tangent was dropped). Not while torch.compile traces."""
    return not is_compiling() and (_functorch_active() or _forward_ad._current_level >= 0)


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
# Whether torch.autocast is on for any device type: ~60 ns a call against ~190 for
# torch.is_autocast_enabled("cpu"), on every call of the chain's entry (fastlenet/chain.py).
autocast_any = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
)


def autocast_inputs(input, weight, bias):
    """(input, weight, bias) as stock's conv2d and linear take them under torch.autocast on
    the input's device type: float32 (and other floating-point tensors but float64) cast to the
    autocast dtype by a differentiable cast, as autocast casts them; as they are where autocast
    is off. The ops then run in that dtype (on the CPU, by the reference: backends.resolve), so
    their outputs have stock's dtype and their gradients flow back to the caller's dtypes.
    Before the argument checks: a layer after another gets a half-precision input and a float32
    weight, which stock's autocast casts to one dtype. A non-tensor argument is left as it is,
    for the checks to name."""
    if not isinstance(input, torch.Tensor):  # the checks name the mistake
        return input, weight, bias
    device_type = input.device.type
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.dtype != torch.float64
            and t.device.type == device_type
        )
        return t.to(dtype) if eligible else t

    return cast(input), cast(weight), cast(bias)


def backward_backend(ctx) -> str:
    """The backend that computes a fused Function's backward.

    First-order gradients (grad mode off inside backward: every training step) come from the
    forward's own backend. With create_graph=True grad mode is on, and the gradients must carry
    a graph of their own so that they can be differentiated again (gradient penalties,
    Hessian-vector products): the reference's backward builds them from differentiable PyTorch
    ops, with the argmax and ReLU mask the forward saved, so the second derivative is stock's
    (the mask and the choice of maximum are piecewise constant).
    """
    return "reference" if torch.is_grad_enabled() else ctx.backend


def records_graph(input, weight, bias) -> bool:
    """Whether a fused op's call must go through its autograd Function: grad mode on and a
    tensor that wants a gradient. Otherwise (inference) the op alone runs: Function.apply would
    still build a ctx and save the tensors, ~2 us per call."""
    return torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
