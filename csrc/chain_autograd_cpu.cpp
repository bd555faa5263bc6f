// The chain's autograd node (fastlenet/chain.py decides when a model takes the chain): a C++
// torch::autograd::Function whose forward calls the chain_fwd op and whose backward calls
// chain_bwd (csrc/chain_cpu.cpp), so a training step's backward runs no Python for the chain.
// Math: fastlenet/reference.py (conv_relu_pool, linear_relu), layer by layer.
// Saves for backward: input, every weight, and what chain_fwd returns for chain_bwd (each
// layer's input but the first's, each conv's argmax, each dropout's noise and the output before
// it of a linear with ReLU); out only where the last layer's ReLU reads it (a chain ending in a
// plain linear leaves its logits free to change in place, as stock's addmm does). The biases are
// kept beside, unsaved (see forward).
//
// Why C++: a Python autograd.Function's node cost ~16 us per backward on the 2-core VM (GIL,
// Python objects for its arguments and saved tensors; a Function with ten parameters and a
// backward returning None, then cross-entropy: 30.0 us, cross-entropy alone 13.5 us). LeNet-5
// step, default SGD, 2 threads, the Python Function -> this, alternating in one process:
// batch 1 252 -> 226 us, 8 327 -> 301 us, 64 703 -> 688 us.
// A backward with create_graph (second derivatives) or under vmap (a batched gradient) calls
// fastlenet.chain._grads_with_graph, which recomputes the chain layer by layer with a graph, as
// the per-layer path does.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "chain_ops.h"

namespace fastlenet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Per layer, a weight and an optional bias; `vars` holds the parameters that are tensors.
struct Params {
  std::vector<at::Tensor> weights;
  c10::List<std::optional<at::Tensor>> biases;
};

// Whether the chain's last layer is a linear with ReLU, whose backward reads `out` as its mask
// (a conv's reads its argmax, a plain linear's nothing of it). spec: kChainInts per layer, the
// kind first, a linear's relu flag next (fastlenet/chain.py).
bool last_reads_out(const std::vector<int64_t>& spec) {
  if (spec.size() < kChainInts) return false;
  const size_t last = spec.size() - kChainInts;
  return spec[last] == kChainLinear && spec[last + 1] != 0;
}

Params split(at::TensorList vars, at::IntArrayRef has_bias) {
  Params p;
  size_t v = 0;
  for (const int64_t b : has_bias) {
    p.weights.push_back(vars[v++]);
    p.biases.push_back(b != 0 ? std::optional<at::Tensor>(vars[v++]) : std::nullopt);
  }
  return p;
}

}  // namespace

// The node's name (grad_fn.name()): fastlenet::ChainFunction.
struct ChainFunction : torch::autograd::Function<ChainFunction> {
  // vars: the layers' weights and biases in order, without the missing biases (has_bias).
  // dropout: per layer the p of a dropout on its output, or empty (chain_fwd's).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::TensorList vars,
                            const std::vector<int64_t>& has_bias, const std::vector<int64_t>& spec,
                            const std::vector<double>& dropout) {
    static const auto fwd = op<ChainFwd>("fastlenet::chain_fwd");
    const at::AutoDispatchBelowADInplaceOrView below;  // already past autograd
    const Params p = split(vars, has_bias);
    auto [out, activations, argmax, dropped] = fwd.call(input, p.weights, p.biases, spec, dropout);
    variable_list saved{input, last_reads_out(spec) ? out : at::Tensor()};
    saved.insert(saved.end(), p.weights.begin(), p.weights.end());
    saved.insert(saved.end(), activations.begin(), activations.end());
    saved.insert(saved.end(), argmax.begin(), argmax.end());
    saved.insert(saved.end(), dropped.begin(), dropped.end());
    ctx->save_for_backward(saved);
    // The biases are not saved for backward: stock's conv and linear backward read none, so a
    // bias may change in place before backward (an optimizer stepped between forward and
    // backward). Only the recomputation under create_graph reads them: they are kept with
    // their versions, which it checks.
    std::vector<at::Tensor> biases;
    std::vector<int64_t> versions;
    for (const std::optional<at::Tensor>& b : p.biases) {
      if (!b.has_value()) continue;
      biases.push_back(*b);
      versions.push_back(static_cast<int64_t>(b->_version()));
    }
    ctx->saved_data["biases"] = biases;
    ctx->saved_data["bias_versions"] = versions;
    ctx->saved_data["spec"] = spec;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["activations"] = static_cast<int64_t>(activations.size());
    ctx->saved_data["dropped"] = static_cast<int64_t>(dropped.size());
    if (!dropped.empty()) ctx->saved_data["dropout"] = dropout;  // else: no dropout, p = 0 each
    ctx->set_materialize_grads(false);  // none reached out: none for the inputs, as stock's
    return out;
  }

  // One gradient per forward argument: input, each of vars, then none for has_bias, spec and
  // dropout.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    const size_t vars_n = has_bias.size() + std::count(has_bias.begin(), has_bias.end(), 1);
    if (!grad_outputs[0].defined()) return variable_list(1 + vars_n + 3);
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const int64_t n_act = ctx->saved_data["activations"].toInt();
    const int64_t n_dropped = ctx->saved_data["dropped"].toInt();
    const std::vector<double> dropout =
        n_dropped > 0 ? ctx->saved_data["dropout"].toDoubleVector() : std::vector<double>{};
    const at::Tensor& input = saved[0];
    const at::Tensor grad_out = grad_outputs[0].contiguous();
    // Without a ReLU last, chain_bwd does not read `out`: the gradient stands in (its shape).
    const at::Tensor& out = saved[1].defined() ? saved[1] : grad_out;
    const size_t layers = has_bias.size();
    const at::TensorList weights(saved.data() + 2, layers);
    const at::TensorList activations(saved.data() + 2 + layers, n_act);
    const at::TensorList argmax(saved.data() + 2 + layers + n_act,
                                saved.size() - 2 - layers - n_act - n_dropped);
    const at::TensorList dropped(saved.data() + saved.size() - n_dropped, n_dropped);
    std::vector<at::Tensor> grads;  // [input, w0, b0, w1, b1, ...], as chain_bwd's

    // Under create_graph, and under vmap (a batched gradient: autograd.grad's is_grads_batched
    // and jacobian's vectorize use the legacy Batched key, torch.func the functorch one;
    // chain_bwd's Tensor[] arguments give neither a fallback), the layers' own backward,
    // differentiable and batchable.
    const bool batched = grad_out.key_set().has_any(
        c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched}));
    if (at::GradMode::is_enabled() || batched) {
      grads = grads_with_graph(ctx, spec, dropout, dropped, grad_outputs[0], input,
                               saved_params(ctx, weights), vars_n);
    } else {
      static const auto bwd = op<ChainBwd>("fastlenet::chain_bwd");
      const at::AutoDispatchBelowADInplaceOrView below;
      grads = bwd.call(grad_out, input, out, activations, argmax, dropped, weights, spec, dropout,
                       ctx->needs_input_grad(0));
    }
    variable_list result(1 + vars_n + 3);
    if (ctx->needs_input_grad(0)) result[0] = grads[0];
    size_t v = 1;
    for (size_t i = 0; i < has_bias.size(); ++i) {
      if (ctx->needs_input_grad(v)) result[v] = grads[1 + 2 * i];
      ++v;
      if (has_bias[i] == 0) continue;
      if (ctx->needs_input_grad(v)) result[v] = grads[2 + 2 * i];
      ++v;
    }
    return result;
  }

  // The weights and the biases the forward ran with, for a recomputation of it: a bias changed
  // in place since raises, as a saved tensor would.
  static Params saved_params(AutogradContext* ctx, at::TensorList weights) {
    const std::vector<at::Tensor> biases = ctx->saved_data["biases"].toTensorVector();
    const std::vector<int64_t> versions = ctx->saved_data["bias_versions"].toIntVector();
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    Params p;
    size_t b = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      p.weights.push_back(weights[i]);
      if (has_bias[i] == 0) {
        p.biases.push_back(std::nullopt);
        continue;
      }
      const auto version = static_cast<int64_t>(biases[b]._version());
      TORCH_CHECK(version == versions[b],
                  "one of the variables needed for gradient computation has been modified by an "
                  "inplace operation: the bias of layer ",
                  i,
                  " of the chain, which a backward with create_graph recomputes its forward "
                  "with, is at version ",
                  version, "; expected version ", versions[b], " instead");
      p.biases.push_back(biases[b++]);
    }
    return p;
  }

  // [input, w0, b0, w1, b1, ...] with a graph (create_graph), from Python.
  static std::vector<at::Tensor> grads_with_graph(
      AutogradContext* ctx, const std::vector<int64_t>& spec, const std::vector<double>& dropout,
      at::TensorList dropped, const at::Tensor& grad_out, const at::Tensor& input, const Params& p,
      size_t vars_n) {
    std::vector<bool> need{ctx->needs_input_grad(0)};
    std::vector<std::optional<at::Tensor>> biases;
    size_t v = 1;
    for (size_t i = 0; i < p.weights.size(); ++i) {
      need.push_back(ctx->needs_input_grad(v++));
      biases.push_back(p.biases.get(i));
      need.push_back(p.biases.get(i).has_value() && ctx->needs_input_grad(v++));
    }
    TORCH_INTERNAL_ASSERT(v == 1 + vars_n);
    py::gil_scoped_acquire gil;
    const py::object fn = py::module_::import("fastlenet.chain").attr("_grads_with_graph");
    const auto got = fn(spec, grad_out, input, p.weights, biases, need, dropout, dropped.vec())
                         .cast<std::vector<std::optional<at::Tensor>>>();
    std::vector<at::Tensor> grads;
    for (const auto& g : got) grads.push_back(g.value_or(at::Tensor()));
    return grads;
  }
};

// params: per layer its weight and bias (None without one); spec and dropout: fastlenet/chain.py's.
at::Tensor chain_autograd(const at::Tensor& input,
                          const std::vector<std::optional<at::Tensor>>& params,
                          const std::vector<int64_t>& spec, const std::vector<double>& dropout) {
  TORCH_CHECK(params.size() % 2 == 0, "params must hold a weight and a bias per layer, got ",
              params.size(), " values");
  std::vector<at::Tensor> vars;
  std::vector<int64_t> has_bias;
  for (size_t i = 0; i < params.size(); i += 2) {
    TORCH_CHECK(params[i].has_value(), "params: layer ", i / 2, " has no weight");
    vars.push_back(*params[i]);
    has_bias.push_back(params[i + 1].has_value());
    if (params[i + 1].has_value()) vars.push_back(*params[i + 1]);
  }
  return ChainFunction::apply(input, at::TensorList(vars), has_bias, spec, dropout);
}

}  // namespace fastlenet
