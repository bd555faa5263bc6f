// linear -> ReLU on CUDA: tensor checks, allocation and the TORCH_LIBRARY_IMPL(fastlenet, CUDA)
// registration. Math and saved state: fastlenet/reference.py (linear_relu); the kernels are
// described in linear_relu_cuda.cuh, the launchers (no torch header) are in linear_relu_cuda.cu.
// Every launch runs on the current stream of the input's device and is checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_checks.h"

namespace fastlenet {
namespace {

at::Tensor linear_relu_fwd_cuda(const at::Tensor& input_, const at::Tensor& weight_,
                                const std::optional<at::Tensor>& bias_, bool relu) {
  check_linear(input_, weight_, /*reduced_precision=*/true);
  check_bias(bias_, input_, weight_.size(0));
  check_cuda(input_, "input");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t rows = input.size(0), in = input.size(1), cols = weight.size(0);
  at::Tensor out = at::empty({rows, cols}, input.options());
  maybe_poison(out);
  check_launch(
      cuda::linear_relu_fwd(cuda_dtype(input), input.const_data_ptr(), weight.const_data_ptr(),
                            bias.defined() ? bias.const_data_ptr() : nullptr, out.data_ptr(), rows,
                            in, cols, relu, c10::cuda::getCurrentCUDAStream().stream()),
      "linear_relu_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_bwd_cuda(const at::Tensor& grad_out_,
                                                                    const at::Tensor& out_,
                                                                    const at::Tensor& input_,
                                                                    const at::Tensor& weight_,
                                                                    bool relu) {
  check_linear(input_, weight_, /*reduced_precision=*/true);
  check_cuda(input_, "input");
  const int64_t rows = input_.size(0), in = input_.size(1), cols = weight_.size(0);
  check_linear_grad(grad_out_, out_, input_, weight_, relu);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_out = grad_out_.contiguous(), input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor out = relu ? out_.contiguous() : at::Tensor();
  at::Tensor grad_input = at::empty({rows, in}, input.options());
  at::Tensor grad_weight = at::empty({cols, in}, input.options());
  at::Tensor grad_bias = at::empty({cols}, input.options());
  maybe_poison(grad_input);
  maybe_poison(grad_weight);
  maybe_poison(grad_bias);
  check_launch(cuda::linear_relu_bwd(cuda_dtype(input), grad_out.const_data_ptr(),
                                     relu ? out.const_data_ptr() : nullptr, input.const_data_ptr(),
                                     weight.const_data_ptr(), grad_input.data_ptr(),
                                     grad_weight.data_ptr(), grad_bias.data_ptr(), rows, in, cols,
                                     relu, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_relu_bwd");
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CUDA, m) {
  m.impl("linear_relu_fwd", &linear_relu_fwd_cuda);
  m.impl("linear_relu_bwd", &linear_relu_bwd_cuda);
}

}  // namespace fastlenet
