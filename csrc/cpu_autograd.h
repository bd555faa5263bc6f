// What the per-layer autograd nodes of the CPU fast path share (linear_relu_autograd_cpu.cpp,
// conv_relu_pool_autograd_cpu.cpp): their gradient edges, and the backward with a graph
// (create_graph), which calls the
// reference's backward in Python, as the Python Functions' backward_backend does
// (fastlenet/_autograd.py), so that gradients of every order are stock's.
#pragma once

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fastlenet {

// Whether a fast-path entry (conv_relu_pool_autograd, linear_relu_autograd) takes a call, else
// it returns None and its Python caller takes the full path: a dtype the CPU kernels take;
// torch.autocast off on the CPU, under which stock's conv2d and linear cast their inputs
// (fastlenet/_autograd.py, autocast_inputs); and no torch.func transform active (the keys
// torch._C._are_functorch_transforms_active reads) nor a forward-mode tangent on an argument,
// which a C++ autograd Function without a jvp rule would drop (the full path runs stock's
// composition: transforms_active there); and no torch.jit.trace recording (the full path
// records the forward op itself, whose registered autograd formula makes the trace
// differentiable). In Python the checks cost ~0.2 us a call, 9% of linear_relu's 84 -> 10 at
// batch 4 without grad.
inline bool fast_path_takes(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  const at::ScalarType t = input.scalar_type();
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  const auto dual = [](const at::Tensor& x) { return x._fw_grad(/*level=*/0).defined(); };
  return (t == at::kFloat || t == at::kDouble) && !at::autocast::is_autocast_enabled(at::kCPU) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) && !dual(input) &&
         !dual(weight) && !(bias && dual(*bias)) && !torch::jit::tracer::isTracing();
}

// Whether autograd records a call of these arguments: grad mode on and a tensor that requires
// grad (fastlenet/_autograd.py's records_graph). Else the op runs alone.
inline bool records_graph(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() || (bias && bias->requires_grad()));
}

// The forward's arguments start with input, weight and an optional bias; forward records
// saved_data["has_bias"]. Their gradient edges: input, weight, and the bias where there is one.
inline size_t param_edges(torch::autograd::AutogradContext* ctx) {
  return ctx->saved_data["has_bias"].toBool() ? 3 : 2;
}

// backward's result from `grads` (input, weight, bias): each where needs_input_grad asks, none
// for the bias without one or for the fourth, non-tensor argument.
inline torch::autograd::variable_list param_grads(torch::autograd::AutogradContext* ctx,
                                                  const std::vector<at::Tensor>& grads) {
  torch::autograd::variable_list result(4);
  for (size_t i = 0; i < param_edges(ctx); ++i)
    if (ctx->needs_input_grad(i)) result[i] = grads[i];
  return result;
}

// fastlenet.reference.<name>(*args) under the GIL: its tensors, with their graph.
template <typename... Args>
std::vector<at::Tensor> reference_bwd(const char* name, const Args&... args) {
  py::gil_scoped_acquire gil;
  const py::object fn = py::module_::import("fastlenet.reference").attr(name);
  return fn(args...).template cast<std::vector<at::Tensor>>();
}

}  // namespace fastlenet
