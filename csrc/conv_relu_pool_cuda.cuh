// conv2d -> ReLU -> max_pool2d on CUDA: kernel bodies (launchers in conv_relu_pool_cuda.cu).
// The same source runs in the CPU simulator of tests/cuda_sim/ (see cuda_common.cuh).
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: out and argmax (N, O, PH, PW); grad_x, grad_w and grad_b from grad_out and argmax.
// Saves for backward (the caller does): x, w and argmax, one byte per pooled output.
//
// Shapes (all contiguous, row-major): input x (N, C, H, W); weight w (O, C, KH, KW); bias b (O);
// conv output y (N, O, OH, OW), never stored; pooled output out and argmax (N, O, PH, PW).
// Accumulation is in acc_t<T> (float32, or float64 for float64 data).
//
// Kernels:
//  - conv_relu_pool_fwd_kernel: one block = OCB output channels and a tile of tph x tpw pooled
//    outputs of `samples` samples (ConvFwdPlan), one thread per pooled output, the threads
//    sample-major in a 1-D block of whole warps (the lanes past samples * tph * tpw only help
//    staging). The input patches under the tile and the weights of the OCB channels are staged
//    in shared memory, a chunk of channels at a time; each thread keeps OCB conv accumulators
//    in registers, visits the window positions one after the other and keeps max/argmax in
//    registers. When the channel chunk does not cover all channels, it is re-staged for every
//    window position (only for wide layers). Without staging (Stage = false: a patch of one
//    channel does not fit) it reads global memory directly.
//  - conv_output_grad_kernel: the gradient of every conv output (grad_out where it is a
//    window's argmax, else 0; summed over windows that overlap), into a dense workspace dy in
//    acc_t<T>; then conv_relu_pool_bwd_input_kernel: one thread per input element, gathering
//    dy * w from every conv output its weights touch. No atomics, a fixed summation order.
//    Adding d * w for d = 0 too costs little here and makes Inf/NaN in w propagate exactly as
//    in stock's dense backward (the reference).
//  - conv_relu_pool_bwd_weight_partial_kernel: block (s, o) sums the contributions of a fixed
//    slice s of the N*PH*PW pooled positions to every grad_w[o] element (and grad_b[o], as
//    element K = C*KH*KW with input 1); threads along y split the slice, a shared-memory tree
//    adds their sums; the block writes its partial sums (or atomically adds them, opt-in).
//    conv_relu_pool_bwd_weight_reduce_kernel adds the partials of each element in a fixed
//    order (lanes over strided slices, then a tree): bitwise reproducible from run to run.
//    Stock's dense backward multiplies the zero gradient of every other conv output by x too:
//    nonfinite_kernel flags Inf/NaN in x on the device (no host sync), and then the partial
//    kernel runs over every conv output (dense mode) so that 0 * Inf/NaN propagates exactly as
//    in the reference.
#pragma once

#include "cuda_common.cuh"

namespace fastlenet::cuda {

constexpr uint8_t kNoGrad = 255;  // argmax byte: no gradient flows through this window

template <typename T, int OCB, bool Stage>
__global__ void conv_relu_pool_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                          const T* __restrict__ bias, T* __restrict__ out,
                                          uint8_t* __restrict__ argmax, ConvGeom g, ConvFwdPlan p) {
  using A = acc_t<T>;
  FASTLENET_DYNAMIC_SMEM(smem_raw);
  const int64_t tph = p.tph, tpw = p.tpw, tsize = tph * tpw;
  const int64_t tih = ((tph - 1) * g.psh + g.poolh - 1) * g.sh + g.kh;
  const int64_t tiw = ((tpw - 1) * g.psw + g.poolw - 1) * g.sw + g.kw;
  const int64_t patch = tih * tiw, ksize = g.kh * g.kw, chunk = p.chunk;
  A* xs = reinterpret_cast<A*>(smem_raw);  // [samples][channels of the chunk][tih][tiw]
  A* ws = xs + p.samples * chunk * patch;  // [channels of the chunk][OCB][kh][kw]

  const int64_t tile = blockIdx.x;
  const int64_t ph0 = (tile / p.tiles_w) * tph, pw0 = (tile % p.tiles_w) * tpw;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * OCB;
  // 32-bit thread and staging indices: a 64-bit division by a run-time divisor is a slow
  // call on the GPU (and costs registers: 76 -> 56 for the staged float32 kernel on sm_80).
  const int t32 = static_cast<int>(threadIdx.x), nthreads32 = static_cast<int>(blockDim.x);
  const int tsize32 = static_cast<int>(tsize);
  const int64_t s = t32 / tsize32;  // this thread's sample in the block's group
  const int64_t ty = (t32 % tsize32) / static_cast<int>(tpw),
                tx = (t32 % tsize32) % static_cast<int>(tpw);
  const int64_t ph = ph0 + ty, pw = pw0 + tx;
  const bool in_tile = s < p.samples && ph < g.ph && pw < g.pw;
  // Top-left input row/column of the tile (may be negative: padding).
  const int64_t iy0 = ph0 * g.psh * g.sh - g.padh, ix0 = pw0 * g.psw * g.sw - g.padw;
  const int64_t qn = g.poolh * g.poolw;
  const bool single_chunk = chunk >= g.c;

  for (int64_t n0 = static_cast<int64_t>(blockIdx.z) * p.samples; n0 < g.n;
       n0 += static_cast<int64_t>(gridDim.z) * p.samples) {
    const int64_t group = imin(p.samples, g.n - n0);  // samples of this group
    const int64_t n = n0 + s;
    const bool active = in_tile && s < group;
    const T* xn = x + (active ? n : n0) * g.c * g.h * g.w;
    A best[OCB];
    int pos[OCB];
    for (int64_t q = 0; q < qn; ++q) {
      const int64_t i = q / g.poolw, j = q % g.poolw;
      A acc[OCB];
      for (int k = 0; k < OCB; ++k)
        acc[k] = (bias != nullptr && o0 + k < g.o) ? to_acc(bias[o0 + k]) : A(0);
      // Tile coordinates of this thread's conv output's top-left input.
      const int64_t ry = (ty * g.psh + i) * g.sh, rx = (tx * g.psw + j) * g.sw;
      for (int64_t c0 = 0; c0 < g.c; c0 += (Stage ? chunk : g.c)) {
        const int64_t cn = Stage ? imin(chunk, g.c - c0) : g.c;
        if (Stage && (!single_chunk || q == 0)) {
          __syncthreads();  // the previous chunk is no longer read
          // 32-bit staging indices (the chunk fits in shared memory, far below 2^31 elements).
          const int cn32 = static_cast<int>(cn), patch32 = static_cast<int>(patch);
          const int tih32 = static_cast<int>(tih), tiw32 = static_cast<int>(tiw);
          for (int e = t32; e < static_cast<int>(group) * cn32 * patch32; e += nthreads32) {
            const int64_t ss = e / (cn32 * patch32), cc = (e / patch32) % cn32;
            const int64_t iy = iy0 + (e / tiw32) % tih32, ix = ix0 + e % tiw32;
            xs[e] = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
                        ? to_acc(x[(((n0 + ss) * g.c + c0 + cc) * g.h + iy) * g.w + ix])
                        : A(0);
          }
          const int ksize32 = static_cast<int>(ksize);
          for (int e = t32; e < cn32 * OCB * ksize32; e += nthreads32) {
            const int64_t cc = e / (OCB * ksize32), k = (e / ksize32) % OCB, t = e % ksize32;
            ws[e] = (o0 + k < g.o) ? to_acc(w[((o0 + k) * g.c + c0 + cc) * ksize + t]) : A(0);
          }
          __syncthreads();
        }
        if (!active) continue;
        for (int64_t cc = 0; cc < cn; ++cc) {
          for (int64_t kh = 0; kh < g.kh; ++kh) {
            for (int64_t kw = 0; kw < g.kw; ++kw) {
              A xv;
              if constexpr (Stage) {
                xv = xs[((s * cn + cc) * tih + ry + kh) * tiw + rx + kw];
              } else {
                const int64_t iy = iy0 + ry + kh, ix = ix0 + rx + kw;
                xv = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
                         ? to_acc(xn[((c0 + cc) * g.h + iy) * g.w + ix])
                         : A(0);
              }
              for (int k = 0; k < OCB; ++k) {
                A wv;
                if constexpr (Stage)
                  wv = ws[((cc * OCB + k) * g.kh + kh) * g.kw + kw];
                else
                  wv = (o0 + k < g.o)
                           ? to_acc(w[((o0 + k) * g.c + c0 + cc) * ksize + kh * g.kw + kw])
                           : A(0);
                acc[k] += wv * xv;
              }
            }
          }
        }
      }
      if (!active) continue;
      for (int k = 0; k < OCB; ++k) {
        // max_pool2d's rule: the first value, then a strictly larger value or a NaN (so the
        // first of tied values and the last NaN win).
        const A v = acc[k];
        if (q == 0 || v > best[k] || v != v) {
          best[k] = v;
          pos[k] = static_cast<int>(q);
        }
      }
    }
    if (active) {
      for (int k = 0; k < OCB; ++k) {
        if (o0 + k >= g.o) break;
        const int64_t idx = ((n * g.o + o0 + k) * g.ph + ph) * g.pw + pw;
        const A m = best[k];
        // `m <= 0` is false for NaN: a NaN max stays NaN and passes gradient, as stock
        // ReLU's backward (which zeroes only where out <= 0).
        out[idx] = from_acc<T>(m <= A(0) ? A(0) : m);
        argmax[idx] = m <= A(0) ? kNoGrad : static_cast<uint8_t>(pos[k]);
      }
    }
    __syncthreads();  // the next group re-stages shared memory
  }
}

// The gradient of the conv output at (oh, ow) of the pooled plane starting at flat index
// `plane`: grad_out of every window whose argmax it is (several when windows overlap), 0 when
// there is none. Coordinates within a plane are 32-bit (the bindings check that a plane fits):
// a 64-bit division by a run-time divisor is a slow call on the GPU.
template <typename T>
__device__ __forceinline__ acc_t<T> conv_output_grad(const T* __restrict__ grad_out,
                                                     const uint8_t* __restrict__ argmax,
                                                     const ConvGeom& g, int64_t plane, int oh,
                                                     int ow) {
  using A = acc_t<T>;
  const int psh = static_cast<int>(g.psh), psw = static_cast<int>(g.psw);
  const int poolh = static_cast<int>(g.poolh), poolw = static_cast<int>(g.poolw);
  const int pw_n = static_cast<int>(g.pw);
  const int ph_lo = oh >= poolh ? ceil_div(oh - poolh + 1, psh) : 0;
  const int ph_hi = imin(oh / psh, static_cast<int>(g.ph) - 1);
  const int pw_lo = ow >= poolw ? ceil_div(ow - poolw + 1, psw) : 0;
  const int pw_hi = imin(ow / psw, pw_n - 1);
  A d = A(0);
  for (int ph = ph_lo; ph <= ph_hi; ++ph)
    for (int pw = pw_lo; pw <= pw_hi; ++pw) {
      const int64_t idx = plane + ph * pw_n + pw;
      // kNoGrad and bytes that are no window position never match.
      if (argmax[idx] == (oh - ph * psh) * poolw + (ow - pw * psw)) d += to_acc(grad_out[idx]);
    }
  return d;
}

// *flag += 1 (once per thread that sees one) when x holds an Inf or a NaN; *flag starts at 0.
template <typename T>
__global__ void nonfinite_kernel(const T* __restrict__ x, int64_t total, int* __restrict__ flag) {
  using A = acc_t<T>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool found = false;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const A v = to_acc(x[e]);
    found |= !(v - v == A(0));  // v - v is NaN for Inf and NaN, 0 otherwise
  }
  if (found) atomicAdd(flag, 1);
}

// dy[e], e over (N, O, OH, OW): the gradient of conv output e (conv_output_grad), once per
// conv output, so that bwd_input's gather reads it instead of redoing the window search for
// each of the KH * KW input elements under it.
template <typename T>
__global__ void conv_output_grad_kernel(const T* __restrict__ grad_out,
                                        const uint8_t* __restrict__ argmax,
                                        acc_t<T>* __restrict__ dy, ConvGeom g) {
  const int64_t plane = g.oh * g.ow, total = g.n * g.o * plane;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int ow_n = static_cast<int>(g.ow);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t no = e / plane;
    const int r = static_cast<int>(e - no * plane);  // 32-bit: a plane fits (bindings)
    dy[e] = conv_output_grad(grad_out, argmax, g, no * g.ph * g.pw, r / ow_n, r % ow_n);
  }
}

// One thread per input element, gathering dy * w from every conv output its weights touch.
template <typename T>
__global__ void conv_relu_pool_bwd_input_kernel(const acc_t<T>* __restrict__ dy,
                                                const T* __restrict__ w, T* __restrict__ grad_in,
                                                ConvGeom g) {
  using A = acc_t<T>;
  const int64_t total = g.n * g.c * g.h * g.w;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int kh_n = static_cast<int>(g.kh), kw_n = static_cast<int>(g.kw);
  const int sh = static_cast<int>(g.sh), sw = static_cast<int>(g.sw);
  const int ow_n = static_cast<int>(g.ow);
  const int64_t plane = g.oh * g.ow, filters = g.c * g.kh * g.kw;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t xx = e % g.w, yy = (e / g.w) % g.h, c = (e / (g.w * g.h)) % g.c;
    const int64_t n = e / (g.w * g.h * g.c);
    // Position in the padded input, then the conv outputs touching it: oh*SH + kh = py with
    // 0 <= kh < KH, 0 <= oh < OH (32-bit: the bindings check that a padded plane fits).
    const int py = static_cast<int>(yy + g.padh), px = static_cast<int>(xx + g.padw);
    const int oh_lo = py >= kh_n ? ceil_div(py - kh_n + 1, sh) : 0;
    const int oh_hi = imin(py / sh, static_cast<int>(g.oh) - 1);
    const int ow_lo = px >= kw_n ? ceil_div(px - kw_n + 1, sw) : 0;
    const int ow_hi = imin(px / sw, static_cast<int>(g.ow) - 1);
    const T* wc = w + c * g.kh * g.kw;
    const A* dyn = dy + n * g.o * plane;  // sample n's first conv output plane
    A acc = A(0);
    // Output channels innermost: each conv position's window arithmetic is done once for all.
    for (int oh = oh_lo; oh <= oh_hi; ++oh) {
      for (int ow = ow_lo; ow <= ow_hi; ++ow) {
        const T* wk = wc + (py - oh * sh) * kw_n + (px - ow * sw);
        const A* d = dyn + oh * ow_n + ow;
        // d * w is added even when d is 0, so that 0 * Inf/NaN in w propagates as in stock's
        // dense conv backward.
        for (int64_t o = 0; o < g.o; ++o) acc += d[o * plane] * to_acc(wk[o * filters]);
      }
    }
    grad_in[e] = from_acc<T>(acc);
  }
}

// blockDim = (KT, PY), PY a power of two; grid = (slices, O). partial: [slices][O][K + 1].
template <typename T, int KT, int PY>
__global__ void conv_relu_pool_bwd_weight_partial_kernel(
    const T* __restrict__ grad_out, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
    acc_t<T>* __restrict__ partial, ConvGeom g, const int* __restrict__ nonfinite, bool atomics) {
  using A = acc_t<T>;
  __shared__ A red[PY][KT];
  const int64_t o = blockIdx.y, slice = blockIdx.x, slices = gridDim.x;
  const int64_t tx = threadIdx.x, ty = threadIdx.y;
  const int64_t ksize = g.kh * g.kw, K = g.c * ksize;
  // Dense mode when x holds Inf/NaN: every conv output contributes d * x (d = 0 off the
  // argmax positions), so that 0 * Inf/NaN propagates as in stock's dense conv backward.
  const bool dense = *nonfinite != 0;
  const int64_t plane = dense ? g.oh * g.ow : g.ph * g.pw, P = g.n * plane;
  const int64_t qn = g.poolh * g.poolw;
  const int64_t p0 = slice * P / slices, p1 = (slice + 1) * P / slices;
  A* dst = partial + (atomics ? 0 : slice * g.o * (K + 1)) + o * (K + 1);
  for (int64_t k0 = 0; k0 < K + 1; k0 += KT) {
    const int64_t k = k0 + tx;
    const int64_t c = k / ksize, kh = (k % ksize) / g.kw, kw = k % g.kw;
    A acc = A(0);
    if (k <= K) {
      // Position p = n * plane + r, stepped by PY without a 64-bit division per step (a slow
      // call on the GPU): r, the position within the plane, is 32-bit (the bindings check
      // that a plane fits) and carries into n.
      const int plane32 = static_cast<int>(plane), poolw = static_cast<int>(g.poolw);
      const int pw_n = static_cast<int>(g.pw), ow_n = static_cast<int>(g.ow);
      int64_t n = (p0 + ty) / plane;
      int r = static_cast<int>((p0 + ty) % plane) - PY;  // advanced by PY first thing
      for (int64_t p = p0 + ty; p < p1; p += PY) {
        for (r += PY; r >= plane32; r -= plane32) ++n;
        int oh, ow;
        A gv;
        if (!dense) {
          const int64_t idx = (n * g.o + o) * plane + r;
          const int q = argmax[idx];
          // kNoGrad, or a byte that is no window position (never written by the forward; the
          // CPU binding rejects it, checking here would cost a device sync): no gradient.
          if (q >= qn) continue;
          gv = to_acc(grad_out[idx]);
          oh = (r / pw_n) * static_cast<int>(g.psh) + q / poolw;
          ow = (r % pw_n) * static_cast<int>(g.psw) + q % poolw;
        } else {
          oh = r / ow_n;
          ow = r % ow_n;
          gv = conv_output_grad(grad_out, argmax, g, (n * g.o + o) * g.ph * g.pw, oh, ow);
        }
        if (k == K) {  // the bias "weight": input 1
          acc += gv;
          continue;
        }
        const int64_t iy = oh * g.sh + kh - g.padh, ix = ow * g.sw + kw - g.padw;
        // Padding is a 0 that still multiplies (Inf * 0 is NaN, as in stock).
        const A xv = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
                         ? to_acc(x[((n * g.c + c) * g.h + iy) * g.w + ix])
                         : A(0);
        acc += gv * xv;
      }
    }
    red[ty][tx] = acc;
    __syncthreads();
    for (int s = PY / 2; s > 0; s /= 2) {
      if (ty < s) red[ty][tx] += red[ty + s][tx];
      __syncthreads();
    }
    if (ty == 0 && k <= K) {
      if (atomics)
        atomicAdd(dst + k, red[0][tx]);
      else
        dst[k] = red[0][tx];
    }
    __syncthreads();  // red[0] is read above before the next chunk overwrites it
  }
}

// Block of (RE, RL) threads: RE consecutive elements e of [O][K + 1] (a warp's loads
// coalesce), RL lanes each. Lane l adds the partials of slices l, l + RL, ... in order, then a
// shared-memory tree adds the lanes' sums: a fixed order, so bitwise reproducible, with RL
// loads in flight per element instead of one.
template <typename T, int RE, int RL>
__global__ void conv_relu_pool_bwd_weight_reduce_kernel(const acc_t<T>* __restrict__ partial,
                                                        T* __restrict__ grad_w,
                                                        T* __restrict__ grad_b, ConvGeom g,
                                                        int64_t slices) {
  using A = acc_t<T>;
  __shared__ A red[RL][RE];
  const int64_t K = g.c * g.kh * g.kw, total = g.o * (K + 1);
  const int col = static_cast<int>(threadIdx.x), lane = static_cast<int>(threadIdx.y);
  for (int64_t e0 = static_cast<int64_t>(blockIdx.x) * RE; e0 < total;
       e0 += static_cast<int64_t>(gridDim.x) * RE) {
    const int64_t e = e0 + col;
    A sum = A(0);
    if (e < total)
      for (int64_t s = lane; s < slices; s += RL) sum += partial[s * total + e];
    red[lane][col] = sum;
    __syncthreads();
    for (int h = RL / 2; h > 0; h /= 2) {
      if (lane < h) red[lane][col] += red[lane + h][col];
      __syncthreads();
    }
    if (lane == 0 && e < total) {
      const int64_t o = e / (K + 1), k = e % (K + 1);
      if (k == K)
        grad_b[o] = from_acc<T>(red[0][col]);
      else
        grad_w[o * K + k] = from_acc<T>(red[0][col]);
    }
    __syncthreads();  // red[0] is read above before the next round overwrites it
  }
}

}  // namespace fastlenet::cuda
