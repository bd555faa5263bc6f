// What the chain's kernels (chain_cpu.cpp) and its autograd node (chain_autograd_cpu.cpp) share:
// the spec's layout, typed handles of fastlenet ops, found through the dispatcher (the per-layer
// autograd nodes, *_autograd_cpu.cpp, call the ops through them too), the C++ signatures of the
// per-layer ops, and those of the chain_fwd and chain_bwd schemas (csrc/fastlenet.cpp), which
// chain_cpu.cpp's kernels have.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlenet {

// Ints per layer in a chain's `spec` (fastlenet/chain.py's LAYER_INTS): kind, then conv: stride
// (2), padding (2), pool_size (2), pool_stride (2); linear: relu, then unused zeros.
constexpr int64_t kChainInts = 9;
constexpr int64_t kChainConv = 0, kChainLinear = 1;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The per-layer ops' signatures (their schemas in csrc/fastlenet.cpp), which the chain and the
// per-layer autograd nodes call them with.
using ConvFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&,
                                                   at::IntArrayRef, at::IntArrayRef,
                                                   at::IntArrayRef, at::IntArrayRef);
using ConvInfer = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef);
using ConvBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&,
                                                               at::IntArrayRef, at::IntArrayRef,
                                                               at::IntArrayRef, at::IntArrayRef,
                                                               bool, bool);
using LinearFwd = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             bool);
using LinearBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                 const at::Tensor&,
                                                                 const at::Tensor&,
                                                                 const at::Tensor&, bool);

using ChainFwd = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                            std::vector<at::Tensor>>(const at::Tensor&, at::TensorList,
                                                     const c10::List<std::optional<at::Tensor>>&,
                                                     at::IntArrayRef, at::ArrayRef<double>);
using ChainBwd = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::TensorList, at::TensorList, at::TensorList,
                                         at::TensorList, at::IntArrayRef, at::ArrayRef<double>,
                                         bool);

}  // namespace fastlenet
