// A straight chain of fastlenet layers on the CPU, one call forward and one call backward:
// conv_relu_pool layers, then (flattened) linear_relu layers, each run by its own CPU op
// through the dispatcher, so that the chain computes exactly what the layers compute one by
// one (bitwise: the same kernels on the same tensors). A layer's output may pass a dropout in
// training: stock's F.dropout, noise drawn by csrc/dropout_cpu.cpp and multiplied by stock's
// mul, forward and backward (the same bits, and the generator left where stock's leaves it).
// What it saves: every layer's input and its argmax (conv) or its out (linear: the ReLU mask),
// what the per-op backward reads, and each dropout's noise (what stock's mul saves).
// Math: fastlenet/reference.py (conv_relu_pool, linear_relu) and torch.nn.functional.dropout;
// spec layout: kChainInts in chain_ops.h, written by fastlenet/chain.py.
//
// What the chain removes is per-layer overhead outside the kernels: one autograd node and one
// Python-to-C++ call each way instead of one per layer.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "chain_ops.h"
#include "dropout_cpu.h"

namespace fastlenet {
namespace {

struct Layer {
  int64_t kind;
  at::IntArrayRef stride, padding, pool_size, pool_stride;
  bool relu;
};

std::vector<Layer> parse(at::IntArrayRef spec, size_t layers) {
  TORCH_CHECK(spec.size() == layers * kChainInts, "spec must hold ", kChainInts,
              " ints per layer (", layers, " layers), got ", spec.size());
  std::vector<Layer> out;
  bool seen_linear = false;
  for (size_t i = 0; i < layers; ++i) {
    const at::IntArrayRef s = spec.slice(i * kChainInts, kChainInts);
    TORCH_CHECK(s[0] == kChainConv || s[0] == kChainLinear, "spec: layer ", i, " kind must be ",
                kChainConv, " (conv) or ", kChainLinear, " (linear), got ", s[0]);
    TORCH_CHECK(!(seen_linear && s[0] == kChainConv), "spec: layer ", i,
                " is a conv after a linear layer");
    seen_linear = seen_linear || s[0] == kChainLinear;
    out.push_back({s[0], s.slice(1, 2), s.slice(3, 2), s.slice(5, 2), s.slice(7, 2), s[1] != 0});
  }
  return out;
}

// Checks chain_fwd's and chain_bwd's `dropout`: empty, or per layer the p of the dropout on its
// output, in [0, 1) (0: none), 0 for the last layer.
void check_dropout(at::ArrayRef<double> dropout, size_t layers) {
  if (dropout.empty()) return;
  TORCH_CHECK(dropout.size() == layers, "dropout must be empty or hold one p per layer (", layers,
              " layers), got ", dropout.size());
  for (size_t i = 0; i < layers; ++i) {
    const double p = dropout[i];
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: layer ", i, "'s p must be in [0, 1), got ", p);
    TORCH_CHECK(p == 0.0 || i + 1 < layers, "dropout: the last layer's p must be 0, got ", p);
  }
}

// The p of the dropout on layer i's output, 0 for none (no allocation: a chain without dropouts
// pays two branches a layer).
double dropout_p(at::ArrayRef<double> dropout, size_t i) {
  return dropout.empty() ? 0.0 : dropout[i];
}

// Whether layer l's dropout saves its output before the dropout: a linear with ReLU, whose
// backward reads it as its ReLU mask (the next layer's input is the output dropped out).
bool saves_output(const Layer& l) { return l.kind == kChainLinear && l.relu; }

// Tensors a layer with a dropout puts in `dropped`: its noise, then its output where
// saves_output.
size_t dropped_count(const Layer& l) { return saves_output(l) ? 2 : 1; }

// The per-layer ops are called below the Autograd and ADInplaceOrView keys.
// chain_fwd and chain_bwd already passed those keys (the chain's autograd node,
// csrc/chain_autograd_cpu.cpp, runs them below autograd), so for each nested call they only
// ran the autograd fallback's argument scan and view checks again. Measured (LeNet-5 training
// step, torch.optim.SGD momentum, 2 threads, one process alternating with and without the
// guard, median time ratio): batch 1 4.5%, batch 64 1.6%, batch 256 2.0% faster.

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
chain_fwd_cpu(const at::Tensor& input, at::TensorList weights,
              const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef spec,
              at::ArrayRef<double> dropout) {
  static const auto conv = op<ConvFwd>("fastlenet::conv_relu_pool_fwd");
  static const auto linear = op<LinearFwd>("fastlenet::linear_relu_fwd");
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(),
              "weights and biases must be non-empty lists of the same length, got ", weights.size(),
              " and ", biases.size());
  const std::vector<Layer> layers = parse(spec, weights.size());
  check_dropout(dropout, layers.size());
  const at::AutoDispatchBelowADInplaceOrView below;  // see the note above chain_fwd_cpu
  std::vector<at::Tensor> activations, argmaxes, dropped;
  activations.reserve(layers.size() - 1);
  at::Tensor x = input;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& l = layers[i];
    if (i > 0) activations.push_back(x);
    if (l.kind == kChainConv) {
      auto [out, argmax] =
          conv.call(x, weights[i], biases.get(i), l.stride, l.padding, l.pool_size, l.pool_stride);
      argmaxes.push_back(argmax);
      x = out;
    } else {
      x = linear.call(x.dim() == 2 ? x : x.flatten(1), weights[i], biases.get(i), l.relu);
    }
    if (const double p = dropout_p(dropout, i); p > 0.0) {  // F.dropout: input * noise
      at::Tensor noise = dropout_noise(x, p);
      dropped.push_back(noise);
      if (saves_output(l)) dropped.push_back(x);
      x = at::mul(x, noise);
    }
  }
  return {x, activations, argmaxes, dropped};
}

std::vector<at::Tensor> chain_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& out, at::TensorList activations,
                                      at::TensorList argmaxes, at::TensorList dropped,
                                      at::TensorList weights, at::IntArrayRef spec,
                                      at::ArrayRef<double> dropout, bool input_grad) {
  static const auto conv = op<ConvBwd>("fastlenet::conv_relu_pool_bwd");
  static const auto linear = op<LinearBwd>("fastlenet::linear_relu_bwd");
  const std::vector<Layer> layers = parse(spec, weights.size());
  check_dropout(dropout, layers.size());
  size_t dropped_n = 0;
  for (size_t i = 0; i < layers.size(); ++i)
    if (dropout_p(dropout, i) > 0.0) dropped_n += dropped_count(layers[i]);
  TORCH_CHECK(dropped.size() == dropped_n, "dropped must hold ", dropped_n,
              " tensors (a noise per dropout, and the output of a linear with ReLU before it), "
              "got ",
              dropped.size());
  const at::AutoDispatchBelowADInplaceOrView below;  // see the note above chain_fwd_cpu
  const auto convs = std::count_if(layers.begin(), layers.end(),
                                   [](const Layer& l) { return l.kind == kChainConv; });
  TORCH_CHECK(activations.size() + 1 == layers.size(), "activations must hold ", layers.size() - 1,
              " tensors (one per layer but the last), got ", activations.size());
  TORCH_CHECK(argmaxes.size() == static_cast<size_t>(convs), "argmax must hold ", convs,
              " tensors (one per conv layer), got ", argmaxes.size());
  std::vector<at::Tensor> grads(1 + 2 * layers.size());
  at::Tensor g = grad_out;
  size_t conv_index = static_cast<size_t>(convs);
  for (size_t i = layers.size(); i-- > 0;) {
    const Layer& l = layers[i];
    const at::Tensor& x = i > 0 ? activations[i - 1] : input;
    const bool want_input = i > 0 || input_grad;
    // The layer's output before its dropout, where it has one and saves it (its ReLU mask).
    const at::Tensor* before = nullptr;
    if (dropout_p(dropout, i) > 0.0) {
      dropped_n -= dropped_count(l);  // the layer's tensors in `dropped` start here
      const at::Tensor& noise = dropped[dropped_n];
      TORCH_CHECK(noise.sizes() == g.sizes(), "dropped: layer ", i,
                  "'s noise must have the shape of its output, ", g.sizes(), ", got ",
                  noise.sizes());  // a mul would broadcast it
      g = at::mul(g, noise);       // stock's MulBackward0: grad * noise
      if (saves_output(l)) before = &dropped[dropped_n + 1];
    }
    at::Tensor gi;
    if (l.kind == kChainConv) {
      std::tie(gi, grads[1 + 2 * i], grads[2 + 2 * i]) =
          conv.call(g.contiguous(), argmaxes[--conv_index], x, weights[i], l.stride, l.padding,
                    l.pool_size, l.pool_stride, want_input, true);
    } else {
      // The ReLU mask: the layer's output (read only with a ReLU).
      const at::Tensor& y = before != nullptr       ? *before
                            : i + 1 < layers.size() ? activations[i]
                                                    : out;
      std::tie(gi, grads[1 + 2 * i], grads[2 + 2 * i]) =
          linear.call(g.contiguous(), y, x.dim() == 2 ? x : x.flatten(1), weights[i], l.relu);
      if (x.dim() != 2) gi = gi.view(x.sizes());  // the flatten undone
    }
    g = gi;
  }
  grads[0] = input_grad ? g : at::empty({0}, grad_out.options());
  return grads;
}

}  // namespace

// The autograd node calls these through typed handles of these signatures.
static_assert(std::is_same_v<decltype(chain_fwd_cpu), ChainFwd>);
static_assert(std::is_same_v<decltype(chain_bwd_cpu), ChainBwd>);

TORCH_LIBRARY_IMPL(fastlenet, CPU, m) {
  m.impl("chain_fwd", &chain_fwd_cpu);
  m.impl("chain_bwd", &chain_bwd_cpu);
}

}  // namespace fastlenet
