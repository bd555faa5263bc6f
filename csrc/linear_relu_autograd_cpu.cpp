// linear -> ReLU (and plain linear) as a C++ autograd node: the CPU fast path of
// fastlenet.functional.linear_relu / linear (fastlenet/linear_relu.py), where the Python
// LinearReLUFunction serves every other backend and torch.compile; where autograd records
// nothing, the fast path's forward op alone (linear_relu_autograd). Forward: the
// linear_relu_fwd op; backward: linear_relu_bwd, or under create_graph the reference's.
// Math: fastlenet/reference.py (linear_relu). Saves for backward: input, weight, and out (the
// ReLU mask) with a ReLU only, as the Python Function: a plain linear's output may change in
// place before backward, as stock's addmm output may.
//
// Why C++: the Python Function costs ~7 us per forward (Function.apply, a ctx, saving from
// Python) and holds the GIL in the engine. Forward + backward against F.linear (+ relu), stock
// / Python Function / this node alternating in one process, 2-core Xeon VM, medians: 84 -> 10
// at batch 4 90.8 / 95.8 / 70.3 us, 400 -> 120 at batch 4 153.8 / 157.2 / 111.9 us.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <optional>

#include "chain_ops.h"
#include "cpu_autograd.h"

namespace fastlenet {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {
// The forward op's handle, shared by the node and the entry below.
const c10::TypedOperatorHandle<LinearFwd>& linear_fwd() {
  static const auto handle = op<LinearFwd>("fastlenet::linear_relu_fwd");
  return handle;
}
}  // namespace

// The node's name (grad_fn.name()): fastlenet::LinearReLUNode.
struct LinearReLUNode : torch::autograd::Function<LinearReLUNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool relu) {
    const at::AutoDispatchBelowADInplaceOrView below;  // already past autograd
    at::Tensor out = linear_fwd().call(input, weight, bias, relu);
    ctx->save_for_backward({input, weight, relu ? out : at::Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->set_materialize_grads(false);  // none reached out: none for the inputs, as stock's
    return out;
  }

  // Gradients of input, weight, bias (undefined without one), none for relu.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(4);
    const variable_list saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor grad_out = grad_outputs[0].contiguous();
    const at::Tensor& out = relu ? saved[2] : grad_out;  // unread without ReLU: its shape
    std::vector<at::Tensor> grads;
    if (at::GradMode::is_enabled()) {
      grads = reference_bwd("linear_relu_bwd", grad_out, out, saved[0], saved[1], relu);
    } else {
      static const auto bwd = op<LinearBwd>("fastlenet::linear_relu_bwd");
      const at::AutoDispatchBelowADInplaceOrView below;
      auto [gi, gw, gb] = bwd.call(grad_out, out, saved[0], saved[1], relu);
      grads = {gi, gw, gb};
    }
    return param_grads(ctx, grads);
  }
};

// The forward op's autograd kernel: the node where autograd records, else the op below
// autograd. The Python Function reaches it with grad mode off (it then only passes the call
// on); it serves a graph that holds the op (a torch.jit.trace, an exported program), so that it
// trains.
at::Tensor linear_relu_fwd_autograd(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, bool relu) {
  if (records_graph(input, weight, bias)) return LinearReLUNode::apply(input, weight, bias, relu);
  const at::AutoDispatchBelowADInplaceOrView below;
  return linear_fwd().call(input, weight, bias, relu);
}

// The fast path's entry: the op's autograd kernel (the node, or the op alone as the Python
// path's inference branch calls it) where fast_path_takes, else None. The op from here rather
// than as torch.ops' overload from Python: that call's Python half costs ~0.9 us (84 -> 10 at
// batch 64 under no_grad, 2-core Xeon VM: the overload 4.21 us, F.linear 4.52).
std::optional<at::Tensor> linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, bool relu) {
  if (!fast_path_takes(input, weight, bias)) return std::nullopt;
  return linear_relu_fwd_autograd(input, weight, bias, relu);
}

TORCH_LIBRARY_IMPL(fastlenet, Autograd, m) { m.impl("linear_relu_fwd", &linear_relu_fwd_autograd); }

}  // namespace fastlenet
