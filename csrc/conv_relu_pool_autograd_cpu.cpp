// conv2d -> ReLU -> max_pool2d as a C++ autograd node: the CPU fast path of
// fastlenet.functional.conv_relu_pool2d (fastlenet/conv_relu_pool.py; contiguous NCHW input
// and weight), where the Python ConvReLUPoolFunction serves every other backend, channels_last
// and torch.compile. Forward: the conv_relu_pool_fwd op; backward: conv_relu_pool_bwd, or under
// create_graph the reference's. Math: fastlenet/reference.py (conv_relu_pool). Saves for
// backward: input, weight, argmax, as the Python Function. Why C++: as the linear one's
// (csrc/linear_relu_autograd_cpu.cpp).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "chain_ops.h"
#include "checks.h"
#include "cpu_autograd.h"

namespace fastlenet {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The node's name (grad_fn.name()): fastlenet::ConvReLUPoolNode.
struct ConvReLUPoolNode : torch::autograd::Function<ConvReLUPoolNode> {
  // geometry: stride, padding, pool_size, pool_stride, two ints each. Returns the op's out and
  // argmax (not differentiable).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::vector<int64_t>& geometry) {
    static const auto fwd = op<ConvFwd>("fastlenet::conv_relu_pool_fwd");
    TORCH_CHECK(geometry.size() == 8, "geometry must hold 8 ints, got ", geometry.size());
    const at::IntArrayRef g(geometry);
    const at::AutoDispatchBelowADInplaceOrView below;  // already past autograd
    auto [out, argmax] =
        fwd.call(input, weight, bias, g.slice(0, 2), g.slice(2, 2), g.slice(4, 2), g.slice(6, 2));
    ctx->save_for_backward({input, weight, argmax});
    ctx->saved_data["geometry"] = geometry;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({argmax});
    // Undefined gradients stay undefined, as stock's nodes take them: none reached out (a
    // Function after it returned None) gives none to input, weight and bias; argmax's (never
    // one) is no zeros(argmax) filled before each backward (1.4 MB at 1 -> 32 3x3 28x28, batch
    // 64: ~9 us, and page faults where glibc had given the memory back).
    ctx->set_materialize_grads(false);
    return {out, argmax};
  }

  // Gradients of input, weight, bias (undefined without one), none for the geometry.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(4);  // no gradient reached out
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> geometry = ctx->saved_data["geometry"].toIntVector();
    const at::IntArrayRef g(geometry);
    const bool input_grad = ctx->needs_input_grad(0);
    const bool weight_grad =
        ctx->needs_input_grad(1) || (param_edges(ctx) == 3 && ctx->needs_input_grad(2));
    const at::Tensor grad_out = grad_outputs[0].contiguous();
    std::vector<at::Tensor> grads;
    if (at::GradMode::is_enabled()) {
      grads = reference_bwd("conv_relu_pool_bwd", grad_out, saved[2], saved[0], saved[1],
                            g.slice(0, 2).vec(), g.slice(2, 2).vec(), g.slice(4, 2).vec(),
                            g.slice(6, 2).vec(), input_grad, weight_grad);
    } else {
      static const auto bwd = op<ConvBwd>("fastlenet::conv_relu_pool_bwd");
      const at::AutoDispatchBelowADInplaceOrView below;
      auto [gi, gw, gb] =
          bwd.call(grad_out, saved[2], saved[0], saved[1], g.slice(0, 2), g.slice(2, 2),
                   g.slice(4, 2), g.slice(6, 2), input_grad, weight_grad);
      grads = {gi, gw, gb};
    }
    return param_grads(ctx, grads);
  }
};

// The fast path's entry: the node where autograd records, else the inference op alone; None
// where fast_path_takes says no or stock's convolution would answer channels_last (the Python
// Function converts the output and gradients). The inference op from here rather than as
// torch.ops' overload from Python: 1 -> 6 5x5 32x32 at batch 1 under no_grad, 8.2 -> 6.0 us a
// call (2-core Xeon VM, alternating processes, 8 rounds).
std::optional<at::Tensor> conv_relu_pool_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::vector<int64_t>& geometry) {
  if (!fast_path_takes(input, weight, bias) || suggests_channels_last(input) ||
      suggests_channels_last(weight))
    return std::nullopt;
  if (!records_graph(input, weight, bias)) {
    static const auto infer = op<ConvInfer>("fastlenet::conv_relu_pool_infer");
    TORCH_CHECK(geometry.size() == 8, "geometry must hold 8 ints, got ", geometry.size());
    const at::IntArrayRef g(geometry);
    return infer.call(input, weight, bias, g.slice(0, 2), g.slice(2, 2), g.slice(4, 2),
                      g.slice(6, 2));
  }
  return ConvReLUPoolNode::apply(input, weight, bias, geometry)[0];
}

// The forward op's autograd kernel: the node where autograd records, else the op below
// autograd. The fast path calls the op below autograd itself, the Python Function with grad
// mode off (this kernel then only passes the call on); it serves a graph that holds the op (a
// torch.jit.trace, an exported program), so that it trains.
std::tuple<at::Tensor, at::Tensor> conv_relu_pool_fwd_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride) {
  if (records_graph(input, weight, bias)) {
    std::vector<int64_t> geometry;
    for (const at::IntArrayRef pair : {stride, padding, pool_size, pool_stride})
      geometry.insert(geometry.end(), pair.begin(), pair.end());
    const variable_list outs = ConvReLUPoolNode::apply(input, weight, bias, geometry);
    return {outs[0], outs[1]};
  }
  static const auto fwd = op<ConvFwd>("fastlenet::conv_relu_pool_fwd");
  const at::AutoDispatchBelowADInplaceOrView below;
  return fwd.call(input, weight, bias, stride, padding, pool_size, pool_stride);
}

TORCH_LIBRARY_IMPL(fastlenet, Autograd, m) {
  m.impl("conv_relu_pool_fwd", &conv_relu_pool_fwd_autograd);
}

}  // namespace fastlenet
