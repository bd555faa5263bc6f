// linear -> ReLU on the CPU (also plain linear, `relu` = false).
// Math and saved state: fastlenet/reference.py (linear_relu).
// Computes: out (B, O) from input (B, I), weight (O, I), bias (O); grad_input, grad_weight and
// grad_bias in one call.
// Saves for backward (the autograd Function does): input, weight and out, the ReLU mask.
//
// The products go through ATen/BLAS; what is fused is everything around them: bias and ReLU in
// one pass over the product, and the mask, the masked gradient and grad_bias in one pass (each
// task owns a column range: deterministic grad_bias). With two threads the backward's two
// products run side by side, one thread each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace fastlenet {
namespace {

// Elements per parallel task of the elementwise passes: below this a parallel region costs
// more than the pass (LeNet-5's layers at batch 64 run serially).
constexpr int64_t kElementGrain = 1 << 15;
// With this many threads the backward's two products (the same number of multiply-adds) run
// side by side, one thread each: the BLAS splits one small product over two threads poorly
// (measured faster this way for each of LeNet-5's three fc layers, most at small batches). With
// more threads each product keeps all of them, one after the other (side by side would leave
// most of them idle).
constexpr int kSideBySideThreads = 2;

at::Tensor linear_relu_fwd_cpu(const at::Tensor& input_, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool relu) {
  check_linear(input_, weight);
  check_bias(bias, input_, weight.size(0));
  TORCH_CHECK(input_.device().is_cpu(), "input must be a CPU tensor, got ", input_.device());
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::mm(input, weight.t());
  const int64_t rows = out.size(0), cols = out.size(1);
  if (!relu && !bias.has_value()) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_relu_fwd_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const int64_t row_grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1));
    // One loop per case, each branch-free inside, so that each vectorises.
    at::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
      const scalar_t* __restrict bias_row = bp;  // a local: see linear_relu_bwd_cpu
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict row = o + r * cols;
        if (bias_row && relu) {
          // `v <= 0` is false for NaN, so NaN propagates as in torch.relu.
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t v = row[c] + bias_row[c];
            row[c] = v <= scalar_t(0) ? scalar_t(0) : v;
          }
        } else if (bias_row) {
          for (int64_t c = 0; c < cols; ++c) row[c] += bias_row[c];
        } else {
          for (int64_t c = 0; c < cols; ++c) row[c] = row[c] <= scalar_t(0) ? scalar_t(0) : row[c];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_bwd_cpu(const at::Tensor& grad_out_,
                                                                   const at::Tensor& out_,
                                                                   const at::Tensor& input_,
                                                                   const at::Tensor& weight,
                                                                   bool relu) {
  check_linear(input_, weight);
  const int64_t rows = input_.size(0), cols = weight.size(0);
  check_linear_grad(grad_out_, out_, input_, weight, relu);
  const at::Tensor grad_out = grad_out_.contiguous();
  const at::Tensor out = relu ? out_.contiguous() : at::Tensor();
  const at::Tensor input = input_.contiguous();
  at::Tensor g = relu ? at::empty_like(grad_out) : grad_out;
  at::Tensor grad_bias = at::empty({cols}, grad_out.options());
  maybe_poison(grad_bias);
  if (relu) maybe_poison(g);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "linear_relu_bwd_cpu", [&] {
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    // Each task owns a column range and sums its rows in order: deterministic grad_bias.
    const int64_t col_grain = std::max<int64_t>(16, kElementGrain / std::max<int64_t>(rows, 1));
    at::parallel_for(0, cols, col_grain, [&](int64_t c0, int64_t c1) {
      // Local restrict pointers: through the lambda's references the compiler would reload
      // them after every store and not vectorise.
      scalar_t* __restrict sum = gb + c0;
      const int64_t width = c1 - c0;
      for (int64_t c = 0; c < width; ++c) sum[c] = scalar_t(0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* __restrict gor = go + r * cols + c0;
        if (op) {  // branch-free inside, so that it vectorises
          const scalar_t* __restrict outr = op + r * cols + c0;
          scalar_t* __restrict gr = gp + r * cols + c0;
          for (int64_t c = 0; c < width; ++c) {
            const scalar_t v = outr[c] <= scalar_t(0) ? scalar_t(0) : gor[c];
            gr[c] = v;
            sum[c] += v;
          }
        } else {
          for (int64_t c = 0; c < width; ++c) sum[c] += gor[c];
        }
      }
    });
  });
  at::Tensor grad_input = at::empty({rows, weight.size(1)}, g.options());
  at::Tensor grad_weight = at::empty({cols, weight.size(1)}, g.options());
  const auto products = [&](int64_t first, int64_t last) {
    // out= variants refuse inputs that require grad while grad mode is on (it is thread-local:
    // set here, on the thread that runs the product).
    const at::NoGradGuard no_grad;
    for (int64_t i = first; i < last; ++i) {
      if (i == 0)
        at::mm_out(grad_input, g, weight);
      else
        at::mm_out(grad_weight, g.t(), input);
    }
  };
  if (at::get_num_threads() == kSideBySideThreads)
    at::parallel_for(0, 2, 1, products);  // one product per thread: the BLAS runs serially
  else
    products(0, 2);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CPU, m) {
  m.impl("linear_relu_fwd", &linear_relu_fwd_cpu);
  m.impl("linear_relu_bwd", &linear_relu_bwd_cpu);
}

}  // namespace fastlenet
