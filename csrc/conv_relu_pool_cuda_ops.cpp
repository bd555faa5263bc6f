// conv2d -> ReLU -> max_pool2d on CUDA: tensor checks, allocation and the
// TORCH_LIBRARY_IMPL(fastlenet, CUDA) registration. Math and saved state:
// fastlenet/reference.py (conv_relu_pool); the kernels are described in conv_relu_pool_cuda.cuh,
// the launchers (no torch header) are in conv_relu_pool_cuda.cu.
// Every launch runs on the current stream of the input's device and is checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_checks.h"

namespace fastlenet {
namespace {

cuda::ConvGeom to_launcher(const ConvPoolGeometry& g) {
  return {g.n,    g.c,  g.h,  g.w,     g.o,     g.kh,  g.kw,  g.sh, g.sw, g.padh,
          g.padw, g.oh, g.ow, g.poolh, g.poolw, g.psh, g.psw, g.ph, g.pw};
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_fwd_cuda(
    const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g = conv_pool_geometry(input_, weight_, stride, padding, pool_size,
                                                pool_stride, /*reduced_precision=*/true);
  check_bias(bias_, input_, g.o);
  check_cuda(input_, "input");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.n, g.o, g.ph, g.pw}, input.options());
  at::Tensor argmax = at::empty({g.n, g.o, g.ph, g.pw}, input.options().dtype(at::kByte));
  maybe_poison(out);
  maybe_poison(argmax);
  check_launch(
      cuda::conv_relu_pool_fwd(cuda_dtype(input), input.const_data_ptr(), weight.const_data_ptr(),
                               bias.defined() ? bias.const_data_ptr() : nullptr, out.data_ptr(),
                               argmax.data_ptr<uint8_t>(), to_launcher(g),
                               c10::cuda::getCurrentCUDAStream().stream()),
      "conv_relu_pool_fwd");
  return {out, argmax};
}

ConvPoolGeometry check_backward(const at::Tensor& grad_out, const at::Tensor& argmax,
                                const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef pool_size, at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g = conv_pool_backward_geometry(grad_out, argmax, input, weight, stride,
                                                         padding, pool_size, pool_stride, true);
  check_cuda(input, "input");
  // The backward kernels walk one plane (padded input, conv output, pooled output) with 32-bit
  // coordinates (conv_relu_pool_cuda.cuh); the margin covers their step past a plane's end.
  constexpr int64_t kMaxPlane = (int64_t{1} << 31) - 1024;
  const int64_t padded = (g.h + 2 * g.padh) * (g.w + 2 * g.padw);
  TORCH_CHECK(padded < kMaxPlane, "input: the CUDA backward needs (H + 2 * padding[0]) * (W + 2 * ",
              "padding[1]) below ", kMaxPlane, ", got ", padded);
  return g;
}

// grad_input (when `input_grad`) and grad_weight / grad_bias (when `weight_grad`): the conv
// outputs' gradient and a gather launch for grad_input, a partial-sum and a reduce launch for
// the weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_pool_bwd_cuda(
    const at::Tensor& grad_out_, const at::Tensor& argmax_, const at::Tensor& input_,
    const at::Tensor& weight_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool input_grad, bool weight_grad) {
  const ConvPoolGeometry g =
      check_backward(grad_out_, argmax_, input_, weight_, stride, padding, pool_size, pool_stride);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_out = grad_out_.contiguous(), argmax = argmax_.contiguous();
  const cuda::DType dtype = cuda_dtype(input_);
  const cuda::ConvGeom cg = to_launcher(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // A gradient not asked for comes back with no elements.
  at::Tensor grad_input = at::empty({0}, input_.options());
  at::Tensor grad_weight = at::empty({0}, weight_.options());
  at::Tensor grad_bias = at::empty({0}, weight_.options());
  if (input_grad) {
    const at::Tensor weight = weight_.contiguous();
    grad_input = at::empty({g.n, g.c, g.h, g.w}, input_.options());
    maybe_poison(grad_input);
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(cuda::conv_relu_pool_bwd_input_workspace(dtype, cg))},
                  input_.options().dtype(at::kByte));
    check_launch(
        cuda::conv_relu_pool_bwd_input(dtype, grad_out.const_data_ptr(),
                                       argmax.const_data_ptr<uint8_t>(), weight.const_data_ptr(),
                                       grad_input.data_ptr(), workspace.data_ptr(), cg, stream),
        "conv_relu_pool_bwd (grad_input)");
  }
  if (weight_grad) {
    const at::Tensor input = input_.contiguous();
    grad_weight = at::empty({g.o, g.c, g.kh, g.kw}, weight_.options());
    grad_bias = at::empty({g.o}, weight_.options());
    maybe_poison(grad_weight);
    maybe_poison(grad_bias);
    const bool atomics = cuda_atomics_enabled();
    at::Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::conv_relu_pool_bwd_weight_workspace(dtype, cg, atomics))},
        input.options().dtype(at::kByte));
    check_launch(cuda::conv_relu_pool_bwd_weight(
                     dtype, grad_out.const_data_ptr(), argmax.const_data_ptr<uint8_t>(),
                     input.const_data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(),
                     workspace.data_ptr(), cg, atomics, stream),
                 "conv_relu_pool_bwd (grad_weight)");
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CUDA, m) {
  m.impl("conv_relu_pool_fwd", &conv_relu_pool_fwd_cuda);
  m.impl("conv_relu_pool_bwd", &conv_relu_pool_bwd_cuda);
}

}  // namespace fastlenet
