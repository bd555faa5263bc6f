// What the per-layer autograd nodes of the CPU fast path share (linear_relu_autograd_cpu.cpp,
// conv_relu_pool_autograd_cpu.cpp): the backward with a graph (create_graph), which calls the
// reference's backward in Python, as the Python Functions' backward_backend does
// (fastlenet/_autograd.py), so that gradients of every order are stock's.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <vector>

namespace fastlenet {

// fastlenet.reference.<name>(*args) under the GIL: its tensors, with their graph.
template <typename... Args>
std::vector<at::Tensor> reference_bwd(const char* name, const Args&... args) {
  py::gil_scoped_acquire gil;
  const py::object fn = py::module_::import("fastlenet.reference").attr(name);
  return fn(args...).template cast<std::vector<at::Tensor>>();
}

}  // namespace fastlenet
