// conv2d -> ReLU -> max_pool2d on the CPU, forward and backward.
//
// Shapes: input x (N, C, H, W); weight w (O, C, KH, KW); bias b (O); conv output
// y (N, O, OH, OW), never stored; pooled output out and argmax (N, O, PH, PW).
//
// Forward:  y[n,o,oh,ow] = b[o] + sum_{c,kh,kw} w[o,c,kh,kw] * xpad[n,c,oh*SH+kh,ow*SW+kw]
//           m = max over the window (i, j) of y[n,o,ph*PSH+i,pw*PSW+j]   (first max in row-major
//               order wins ties; NaN wins over numbers, as max_pool2d)
//           out = relu(m);  argmax = i*POOLW+j of m if m > 0, else 255 (no gradient)
// Saved for backward: x, w and argmax: one byte per pooled output.
// Backward: only (oh, ow) = the argmax of a window with argmax != 255 gets g = grad_out:
//           grad_b[o] += g;  grad_w[o,:,:,:] += g * xpad[n, :, oh*SH:+KH, ow*SW:+KW]
//           grad_x[n, :, oh*SH-PADH:+KH, ow*SW-PADW:+KW] += g * w[o]
//           one patch per pooled output: about a quarter of a dense conv backward's work.
//
// Forward kernel: the vector lanes run over output channels (weight repacked as
// [O/VW][C][KH][KW][VW]); a register block holds R conv outputs of one conv row; each
// (c, kh, kw) loads one weight vector and broadcasts R input values into R FMAs. Conv rows of
// one pooled row stay in a small per-thread tile (L1), reduced to max/argmax right away.
// Backward kernels work on a channels-last padded copy of each sample, where a patch row
// (KW * C values) is contiguous, so each selected patch is KH contiguous AXPYs.
// grad_w/grad_b: samples are split into a fixed number of chunks (one per thread), each
// summing into its own buffer, added in chunk order: bitwise identical run to run for a given
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"

namespace fastlenet {
namespace {

// GCC/Clang vector extension of `Bytes` bytes; with -march=native these become AVX-512/AVX2
// registers, with a portable build the compiler splits them.
template <typename T, int Bytes>
struct VecOf {
  static constexpr int kLanes = Bytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Most conv outputs one register block holds: 14 accumulators + the weight vector fit the 16
// (AVX2) or 32 (AVX-512) vector registers, and 14 covers half of LeNet-5's 28-wide conv1 row.
constexpr int kMaxBlock = 14;

struct Plane {
  int64_t chan;  // elements between channels of the (padded) input plane
  int64_t row;   // elements between rows
};

// R conv outputs at columns ow0 .. ow0+R-1 of one conv row, for VW output channels:
// acc[r] = bias + sum_{c,kh,kw} wt[c,kh,kw,:] * x[c, kh, r*SW + kw], x pointing at the top-left
// input of the first output.
template <typename T, int Bytes, int R, bool UnitStride>
void conv_block(const T* x, Plane p, int64_t sw, const T* wt, int64_t C, int64_t KH, int64_t KW,
                const T* bias, T* dst) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  V acc[R];
  const V b = load<V>(bias);
  for (int r = 0; r < R; ++r) acc[r] = b;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const T* xr = x + c * p.chan + kh * p.row;
      const T* wr = wt + (c * KH + kh) * KW * VW;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const V w = load<V>(wr + kw * VW);
        for (int r = 0; r < R; ++r) acc[r] += w * xr[(UnitStride ? r : r * sw) + kw];
      }
    }
  }
  std::memcpy(dst, acc, sizeof(acc));
}

template <typename T, int Bytes, bool UnitStride>
using BlockFn = void (*)(const T*, Plane, int64_t, const T*, int64_t, int64_t, int64_t, const T*,
                         T*);

template <typename T, int Bytes, bool UnitStride, int... Rs>
constexpr auto block_table(std::integer_sequence<int, Rs...>) {
  return std::array<BlockFn<T, Bytes, UnitStride>, sizeof...(Rs)>{
      &conv_block<T, Bytes, Rs + 1, UnitStride>...};
}

// Computes conv row `oh` for output channels [ob*VW, ob*VW+VW) into tile[ow][VW], ow < width.
template <typename T, int Bytes, bool UnitStride>
void conv_row(const T* xpad, Plane p, const ConvPoolGeometry& g, int64_t oh, int64_t width,
              const T* wt, const T* bias, T* tile) {
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  static constexpr auto table =
      block_table<T, Bytes, UnitStride>(std::make_integer_sequence<int, kMaxBlock>{});
  const int64_t blocks = (width + kMaxBlock - 1) / kMaxBlock;
  const int64_t step = (width + blocks - 1) / blocks;  // even blocks: 28 -> 14 + 14
  for (int64_t ow0 = 0; ow0 < width; ow0 += step) {
    const int64_t r = std::min(step, width - ow0);
    const T* x = xpad + oh * g.sh * p.row + ow0 * g.sw;
    table[r - 1](x, p, g.sw, wt, g.c, g.kh, g.kw, bias, tile + ow0 * VW);
  }
}

template <typename T, int Bytes>
void forward_kernel(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax) {
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  const int64_t oblocks = (g.o + VW - 1) / VW;
  // Weight repacked to [O/VW][C][KH][KW][VW] and bias to [O/VW][VW], zero-padded lanes.
  std::vector<T> wt(oblocks * g.c * g.kh * g.kw * VW, T(0));
  std::vector<T> bt(oblocks * VW, T(0));
  const T* w = weight.const_data_ptr<T>();
  for (int64_t o = 0; o < g.o; ++o) {
    const int64_t ob = o / VW, lane = o % VW;
    for (int64_t k = 0; k < g.c * g.kh * g.kw; ++k)
      wt[(ob * g.c * g.kh * g.kw + k) * VW + lane] = w[o * g.c * g.kh * g.kw + k];
    bt[ob * VW + lane] = bias.defined() ? bias.const_data_ptr<T>()[o] : T(0);
  }
  const bool padded = g.padh > 0 || g.padw > 0;
  const int64_t hp = g.h + 2 * g.padh, wp = g.w + 2 * g.padw;
  // The last pooled window's right edge: conv columns beyond it are never computed.
  const int64_t width = (g.pw - 1) * g.psw + g.poolw;
  const Plane p{hp * wp, wp};
  const T* x = input.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane_out = g.ph * g.pw;
  const bool unit = g.sw == 1;

  at::parallel_for(0, g.n * oblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> pad_buf(padded ? g.c * hp * wp : 0, T(0));
    std::vector<T> tile(g.poolh * width * VW);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / oblocks, ob = t % oblocks;
      const T* xs = x + n * g.c * g.h * g.w;
      if (padded) {
        for (int64_t c = 0; c < g.c; ++c)
          for (int64_t y = 0; y < g.h; ++y)
            std::memcpy(&pad_buf[(c * hp + y + g.padh) * wp + g.padw], xs + (c * g.h + y) * g.w,
                        g.w * sizeof(T));
        xs = pad_buf.data();
      }
      const T* wtb = wt.data() + ob * g.c * g.kh * g.kw * VW;
      const T* btb = bt.data() + ob * VW;
      const int64_t lanes = std::min<int64_t>(VW, g.o - ob * VW);
      for (int64_t ph = 0; ph < g.ph; ++ph) {
        for (int64_t i = 0; i < g.poolh; ++i) {
          T* rowtile = tile.data() + i * width * VW;
          if (unit)
            conv_row<T, Bytes, true>(xs, p, g, ph * g.psh + i, width, wtb, btb, rowtile);
          else
            conv_row<T, Bytes, false>(xs, p, g, ph * g.psh + i, width, wtb, btb, rowtile);
        }
        for (int64_t pw = 0; pw < g.pw; ++pw) {
          T best[VW];
          uint8_t pos[VW];
          const T* first = tile.data() + pw * g.psw * VW;
          for (int l = 0; l < VW; ++l) best[l] = first[l], pos[l] = 0;
          for (int64_t i = 0; i < g.poolh; ++i) {
            for (int64_t j = 0; j < g.poolw; ++j) {
              const T* v = tile.data() + (i * width + pw * g.psw + j) * VW;
              const uint8_t q = static_cast<uint8_t>(i * g.poolw + j);
              for (int l = 0; l < VW; ++l) {
                // max_pool2d's rule: a strictly larger value or a NaN replaces the max.
                const bool take = v[l] > best[l] || v[l] != v[l];
                best[l] = take ? v[l] : best[l];
                pos[l] = take ? q : pos[l];
              }
            }
          }
          const int64_t base = (n * g.o + ob * VW) * plane_out + ph * g.pw + pw;
          for (int64_t l = 0; l < lanes; ++l) {
            const bool live = best[l] > T(0);  // false for NaN and for max <= 0
            outp[base + l * plane_out] = (best[l] <= T(0)) ? T(0) : best[l];
            amp[base + l * plane_out] = live ? pos[l] : kNoGrad;
          }
        }
      }
    }
  });
}

// Channels-last, zero-padded copy of sample n: dst[y][x][c], y < HP, x < WP.
template <typename T>
void to_padded_cl(const T* xs, const ConvPoolGeometry& g, T* dst) {
  const int64_t wp = g.w + 2 * g.padw;
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y)
      for (int64_t xx = 0; xx < g.w; ++xx)
        dst[((y + g.padh) * wp + xx + g.padw) * g.c + c] = xs[(c * g.h + y) * g.w + xx];
}

// Visits every pooled output of sample n, channel o, that passes gradient, with the input
// offset (row, col) of its conv output's top-left tap in the padded input.
template <typename T, typename F>
inline void for_each_live(const T* go, const uint8_t* am, const ConvPoolGeometry& g, F&& f) {
  for (int64_t ph = 0; ph < g.ph; ++ph) {
    for (int64_t pw = 0; pw < g.pw; ++pw) {
      const uint8_t q = am[ph * g.pw + pw];
      if (q == kNoGrad) continue;
      const int64_t oh = ph * g.psh + q / g.poolw, ow = pw * g.psw + q % g.poolw;
      f(go[ph * g.pw + pw], oh * g.sh, ow * g.sw);
    }
  }
}

template <typename T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) y[k] += a * x[k];
}

template <typename T>
void backward_weight_kernel(const at::Tensor& grad_out, const at::Tensor& argmax,
                            const at::Tensor& input, const ConvPoolGeometry& g,
                            at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t hp = g.h + 2 * g.padh, wp = g.w + 2 * g.padw;
  const int64_t rowlen = g.kw * g.c;          // one patch row, channels-last
  const int64_t wsize = g.o * g.kh * rowlen;  // grad_w as [O][KH][KW][C]
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.n));
  std::vector<T> partial(chunks * (wsize + g.o), T(0));
  const T* x = input.const_data_ptr<T>();
  const T* gop = grad_out.const_data_ptr<T>();
  const uint8_t* amp = argmax.const_data_ptr<uint8_t>();
  const int64_t plane_out = g.ph * g.pw;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> xcl(hp * wp * g.c, T(0));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* gw = partial.data() + chunk * (wsize + g.o);
      T* gb = gw + wsize;
      for (int64_t n = chunk * g.n / chunks; n < (chunk + 1) * g.n / chunks; ++n) {
        to_padded_cl(x + n * g.c * g.h * g.w, g, xcl.data());
        for (int64_t o = 0; o < g.o; ++o) {
          const int64_t off = (n * g.o + o) * plane_out;
          T* gwo = gw + o * g.kh * rowlen;
          for_each_live(gop + off, amp + off, g, [&](T gv, int64_t y0, int64_t x0) {
            gb[o] += gv;
            for (int64_t kh = 0; kh < g.kh; ++kh)
              axpy(gwo + kh * rowlen, xcl.data() + ((y0 + kh) * wp + x0) * g.c, gv, rowlen);
          });
        }
      }
    }
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < wsize + g.o; ++k) partial[k] += partial[chunk * (wsize + g.o) + k];
  // [O][KH][KW][C] -> [O][C][KH][KW]
  T* gwp = grad_weight.data_ptr<T>();
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        for (int64_t c = 0; c < g.c; ++c)
          gwp[((o * g.c + c) * g.kh + kh) * g.kw + kw] =
              partial[((o * g.kh + kh) * g.kw + kw) * g.c + c];
  std::memcpy(grad_bias.data_ptr<T>(), partial.data() + wsize, g.o * sizeof(T));
}

template <typename T>
void backward_input_kernel(const at::Tensor& grad_out, const at::Tensor& argmax,
                           const at::Tensor& weight, const ConvPoolGeometry& g,
                           at::Tensor& grad_input) {
  const int64_t hp = g.h + 2 * g.padh, wp = g.w + 2 * g.padw;
  const int64_t rowlen = g.kw * g.c;
  // weight as [O][KH][KW][C]: a patch row of one output channel is contiguous.
  const at::Tensor wcl = weight.permute({0, 2, 3, 1}).contiguous();
  const T* wp_ = wcl.const_data_ptr<T>();
  const T* gop = grad_out.const_data_ptr<T>();
  const uint8_t* amp = argmax.const_data_ptr<uint8_t>();
  T* gi = grad_input.data_ptr<T>();
  const int64_t plane_out = g.ph * g.pw;
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> dx(hp * wp * g.c);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(dx.begin(), dx.end(), T(0));
      for (int64_t o = 0; o < g.o; ++o) {
        const int64_t off = (n * g.o + o) * plane_out;
        const T* wo = wp_ + o * g.kh * rowlen;
        for_each_live(gop + off, amp + off, g, [&](T gv, int64_t y0, int64_t x0) {
          for (int64_t kh = 0; kh < g.kh; ++kh)
            axpy(dx.data() + ((y0 + kh) * wp + x0) * g.c, wo + kh * rowlen, gv, rowlen);
        });
      }
      T* gis = gi + n * g.c * g.h * g.w;
      for (int64_t c = 0; c < g.c; ++c)
        for (int64_t y = 0; y < g.h; ++y)
          for (int64_t xx = 0; xx < g.w; ++xx)
            gis[(c * g.h + y) * g.w + xx] = dx[((y + g.padh) * wp + xx + g.padw) * g.c + c];
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_fwd_cpu(
    const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g =
      conv_pool_geometry(input_, weight_, stride, padding, pool_size, pool_stride);
  check_bias(bias_, input_, g.o);
  check_cpu(input_, "input");
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.n, g.o, g.ph, g.pw}, input.options());
  at::Tensor argmax = at::empty({g.n, g.o, g.ph, g.pw}, input.options().dtype(at::kByte));
  maybe_poison(out);
  maybe_poison(argmax);
  if (g.n == 0) return {out, argmax};
  // Narrow vectors when few output channels would leave most lanes of a wide one empty.
  if (input.scalar_type() == at::kFloat) {
    if (g.o <= 8)
      forward_kernel<float, 32>(input, weight, bias, g, out, argmax);
    else
      forward_kernel<float, 64>(input, weight, bias, g, out, argmax);
  } else {
    if (g.o <= 4)
      forward_kernel<double, 32>(input, weight, bias, g, out, argmax);
    else
      forward_kernel<double, 64>(input, weight, bias, g, out, argmax);
  }
  return {out, argmax};
}

ConvPoolGeometry check_backward(const at::Tensor& grad_out, const at::Tensor& argmax,
                                const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef pool_size, at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g =
      conv_pool_geometry(input, weight, stride, padding, pool_size, pool_stride);
  check_cpu(input, "input");
  check_pooled_grad(grad_out, argmax, input, g);
  return g;
}

at::Tensor conv_relu_pool_bwd_input_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                        const at::Tensor& input, const at::Tensor& weight,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef pool_size, at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g =
      check_backward(grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride);
  at::Tensor grad_input = at::empty({g.n, g.c, g.h, g.w}, input.options());
  maybe_poison(grad_input);
  if (g.n == 0) return grad_input;
  const at::Tensor go = grad_out.contiguous(), am = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_pool_bwd_input_cpu", [&] {
    backward_input_kernel<scalar_t>(go, am, weight, g, grad_input);
  });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_bwd_weight_cpu(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g =
      check_backward(grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride);
  at::Tensor grad_weight = at::empty({g.o, g.c, g.kh, g.kw}, weight.options());
  at::Tensor grad_bias = at::empty({g.o}, weight.options());
  maybe_poison(grad_weight);
  maybe_poison(grad_bias);
  const at::Tensor go = grad_out.contiguous(), am = argmax.contiguous(), x = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_pool_bwd_weight_cpu", [&] {
    backward_weight_kernel<scalar_t>(go, am, x, g, grad_weight, grad_bias);
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CPU, m) {
  m.impl("conv_relu_pool_fwd", &conv_relu_pool_fwd_cpu);
  m.impl("conv_relu_pool_bwd_input", &conv_relu_pool_bwd_input_cpu);
  m.impl("conv_relu_pool_bwd_weight", &conv_relu_pool_bwd_weight_cpu);
}

}  // namespace fastlenet
