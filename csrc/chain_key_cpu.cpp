// The tensor half of fastlenet/chain.py's key (_key), read in C++: whether a chain's
// parameters may run on the chain with `input` (on the CPU, of input's dtype, strided and
// contiguous, or None where a layer has no bias; neither they nor input read as channels_last
// by stock's convolution, checks.h), and if so their sizes, packed as bytes.
//
// Why C++: from Python each parameter cost ~0.3 us (is_cpu, dtype, is_contiguous() and shape,
// each a Tensor attribute through its Python binding); LeNet-5's ten cost 3 us of _key's
// 5.5 us, about 1.5% of its batch-1 training step on the 2-core VM.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <vector>

#include "checks.h"

namespace fastlenet {

// Sizes of each parameter (its dimension count, then its sizes; -1 for None) as bytes, or None
// where one is neither None nor a tensor the chain takes as it is.
py::object chain_signature(const at::Tensor& input, const py::sequence& params) {
  if (suggests_channels_last(input)) return py::none();
  std::vector<int64_t> sig;
  sig.reserve(4 * params.size());
  for (const py::handle p : params) {
    if (p.is_none()) {
      sig.push_back(-1);
      continue;
    }
    if (!THPVariable_Check(p.ptr())) return py::none();
    const at::Tensor& t = THPVariable_Unpack(p.ptr());
    if (t.layout() != at::kStrided || !t.device().is_cpu() ||
        t.scalar_type() != input.scalar_type() || !t.is_contiguous() || suggests_channels_last(t))
      return py::none();
    sig.push_back(t.dim());
    sig.insert(sig.end(), t.sizes().begin(), t.sizes().end());
  }
  return py::bytes(reinterpret_cast<const char*>(sig.data()), sig.size() * sizeof(int64_t));
}

}  // namespace fastlenet
