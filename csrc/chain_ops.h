// What the chain's kernels (chain_cpu.cpp) and its autograd node (chain_autograd_cpu.cpp) share:
// typed handles of fastlenet ops, found through the dispatcher (the per-layer autograd nodes,
// *_autograd_cpu.cpp, call the ops through them too), and the C++ signatures of the
// chain_fwd and chain_bwd schemas (csrc/fastlenet.cpp), which chain_cpu.cpp's kernels have.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlenet {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ChainFwd = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
    at::IntArrayRef);
using ChainBwd = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::TensorList, at::TensorList, at::TensorList,
                                         at::IntArrayRef, bool);

}  // namespace fastlenet
