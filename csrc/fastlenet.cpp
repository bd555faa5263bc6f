// The fastlenet operator library: every schema is written here, once.
// Device sources add only TORCH_LIBRARY_IMPL(fastlenet, CPU|CUDA, m); fake
// (meta) kernels and autograd live beside the Python wrappers in fastlenet/, but for the C++
// autograd nodes of the CPU fast paths (csrc/*_autograd_cpu.cpp).
// The math and semantics of each op: fastlenet/reference.py.
#include <torch/extension.h>

#include "cpu_reuse.h"
#include "dropout_cpu.h"

TORCH_LIBRARY(fastlenet, m) {
  // conv2d -> ReLU -> max_pool2d. `argmax` (uint8, shaped like the output): the
  // window position of each max, or 255 where no gradient flows (fastlenet/reference.py).
  m.def(
      "conv_relu_pool_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] pool_size, int[2] pool_stride) -> (Tensor out, Tensor argmax)");
  // Backward: grad_input when `input_grad`, grad_weight and grad_bias when `weight_grad`, in
  // one call (one pass over argmax); a gradient not asked for comes back with no elements.
  m.def(
      "conv_relu_pool_bwd(Tensor grad_out, Tensor argmax, Tensor input, Tensor weight, "
      "int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, bool input_grad, "
      "bool weight_grad) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The forward's `out` alone, for inference (nothing recorded): the CPU backend's path under
  // no_grad, which skips the argmax where it costs (csrc/conv_relu_pool_cpu.cpp).
  m.def(
      "conv_relu_pool_infer(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] pool_size, int[2] pool_stride) -> Tensor out");
  // linear (-> ReLU when `relu`). The backward takes `out` as the ReLU mask; grad_bias
  // is always returned (the caller drops it without bias).
  m.def("linear_relu_fwd(Tensor input, Tensor weight, Tensor? bias, bool relu) -> Tensor");
  m.def(
      "linear_relu_bwd(Tensor grad_out, Tensor out, Tensor input, Tensor weight, bool relu) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // A straight chain of the ops above as one call each way (fastlenet/chain.py): `spec` holds
  // kChainInts ints per layer (csrc/chain_ops.h), a conv_relu_pool or a linear_relu, with a
  // flatten before the first linear. `dropout`: empty, or per layer the p of a dropout (in
  // training) on its output, 0 for none and for the last layer. What the per-op backward reads:
  // `activations`, every layer's input but the first's (the previous output, dropped out), each
  // conv's `argmax`, and `dropped`: per layer with a dropout its noise, then for a linear with
  // ReLU its output before the dropout (its ReLU mask). chain_bwd returns grad_input (no
  // elements unless `input_grad`), then each layer's grad_weight and grad_bias.
  m.def(
      "chain_fwd(Tensor input, Tensor[] weights, Tensor?[] biases, int[] spec, float[] dropout) "
      "-> (Tensor out, Tensor[] activations, Tensor[] argmax, Tensor[] dropped)");
  m.def(
      "chain_bwd(Tensor grad_out, Tensor input, Tensor out, Tensor[] activations, "
      "Tensor[] argmax, Tensor[] dropped, Tensor[] weights, int[] spec, float[] dropout, "
      "bool input_grad) -> Tensor[]");
}

namespace fastlenet {
// csrc/chain_autograd_cpu.cpp
at::Tensor chain_autograd(const at::Tensor& input,
                          const std::vector<std::optional<at::Tensor>>& params,
                          const std::vector<int64_t>& spec, const std::vector<double>& dropout);
// csrc/chain_key_cpu.cpp
py::object chain_signature(const at::Tensor& input, const py::sequence& params);
// csrc/conv_relu_pool_autograd_cpu.cpp
std::optional<at::Tensor> conv_relu_pool_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::vector<int64_t>& geometry);
// csrc/linear_relu_autograd_cpu.cpp
std::optional<at::Tensor> linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, bool relu);
}  // namespace fastlenet

namespace {
py::dict reuse_stats() {
  const auto [kept, live] = fastlenet::cpu::reuse_stats();
  py::dict d;
  d["kept"] = kept;
  d["live"] = live;
  return d;
}

bool cuda_built() {
#ifdef FASTLENET_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_built", &cuda_built, "True when the CUDA kernels were compiled into this build");
  m.def("release_reused", &fastlenet::cpu::release_reused,
        "Frees the memory kept for reuse by the CPU ops' large tensors (csrc/cpu_reuse.h); "
        "the bytes freed");
  m.def("reuse_stats", &reuse_stats,
        "Bytes the CPU ops' reuse allocator keeps unused ('kept') and has handed out to tensors "
        "not yet freed ('live')");
  m.def("chain", &fastlenet::chain_autograd, py::arg("input"), py::arg("params"), py::arg("spec"),
        py::arg("dropout") = std::vector<double>{},
        "A chain of fastlenet layers as one autograd node (fastlenet/chain.py)");
  m.def("chain_signature", &fastlenet::chain_signature, py::arg("input"), py::arg("params"),
        "The sizes of a chain's parameters as bytes, or None where one cannot take the chain "
        "with `input` (fastlenet/chain.py)");
  m.def("conv_relu_pool", &fastlenet::conv_relu_pool_autograd, py::arg("input"), py::arg("weight"),
        py::arg("bias"), py::arg("geometry"),
        "conv_relu_pool on the CPU op as a C++ autograd node, or the inference op where "
        "autograd records nothing; None where csrc/cpu_autograd.h's fast_path_takes declines "
        "(a dtype, torch.autocast, torch.func, a forward-mode tangent). geometry: stride, "
        "padding, pool_size, pool_stride (fastlenet/conv_relu_pool.py's fast path)");
  m.def("dropout_noise", &fastlenet::dropout_noise, py::arg("like"), py::arg("p"),
        "The noise stock's dropout multiplies a CPU tensor by in training, bit for "
        "bit, drawn from the default CPU generator as stock's draws it "
        "(fastlenet/nn/dropout.py)");
  m.def("linear_relu", &fastlenet::linear_relu_autograd, py::arg("input"), py::arg("weight"),
        py::arg("bias"), py::arg("relu"),
        "linear_relu on the CPU op as a C++ autograd node, or the op where autograd records "
        "nothing; None where csrc/cpu_autograd.h's fast_path_takes declines "
        "(fastlenet/linear_relu.py's fast path)");
}
