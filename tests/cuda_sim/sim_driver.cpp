// Runs one fastlenet CUDA launcher in the CPU simulator (cuda_sim.h) on tensors read from raw
// files, and writes its outputs as raw files: tests/test_cuda_sim.py prepares the inputs,
// runs this program (plain or built with ThreadSanitizer) and compares with
// fastlenet.reference.
//
//   sim_driver OP DIR key=value...
//   OP: conv_fwd | conv_bwd_input | conv_bwd_weight | linear_fwd | linear_bwd
//   dtype=f32|f64|f16|bf16; conv: n c h w o kh kw sh sw padh padw poolh poolw psh psw, and
//   bias=0|1 smem=BYTES (fwd), atomics=0|1 (bwd_weight); linear: batch in out relu=0|1,
//   bias=0|1 (fwd), tile=0|32|64.
//   Files in DIR (native byte order, row-major): conv_fwd x w [b] -> out argmax;
//   conv_bwd_input go am w -> gx; conv_bwd_weight go am x -> gw gb; linear_fwd x w [b] -> out;
//   linear_bwd go [out] x w -> gx gw gb. Each is NAME.bin; argmax/am are uint8.
// Outputs are filled with 0xFF bytes (NaN) before the launch, so an element the kernels never
// write shows. Exit status: 0 done, 1 bad usage or I/O, 2 the launcher returned an error.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "cuda_launchers.h"

namespace {

using fastlenet::cuda::ConvGeom;
using fastlenet::cuda::DType;

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "sim_driver: %s\n", msg.c_str());
  std::exit(1);
}

struct Args {
  std::map<std::string, std::string> kv;
  int64_t get(const std::string& key, int64_t fallback = -1) const {
    const auto it = kv.find(key);
    if (it == kv.end()) {
      if (fallback < 0) fail("missing argument " + key);
      return fallback;
    }
    return std::stoll(it->second);
  }
};

std::vector<unsigned char> read_file(const std::string& dir, const std::string& name,
                                     size_t bytes) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f) fail("cannot read " + name + ".bin");
  std::vector<unsigned char> buf(bytes + 1);
  f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(bytes + 1));
  if (static_cast<size_t>(f.gcount()) != bytes)
    fail(name + ".bin has " + std::to_string(f.gcount()) + " bytes, expected " +
         std::to_string(bytes));
  buf.resize(bytes);
  return buf;
}

void write_file(const std::string& dir, const std::string& name,
                const std::vector<unsigned char>& buf) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  if (!f) fail("cannot write " + name + ".bin");
}

std::vector<unsigned char> poisoned(size_t bytes) {
  return std::vector<unsigned char>(bytes, 0xFF);
}

void check(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "sim_driver: launcher returned error %d (%s)\n", static_cast<int>(e),
                 cudaGetErrorString(e));
    std::exit(2);
  }
}

ConvGeom geometry(const Args& a) {
  ConvGeom g{};
  g.n = a.get("n");
  g.c = a.get("c");
  g.h = a.get("h");
  g.w = a.get("w");
  g.o = a.get("o");
  g.kh = a.get("kh");
  g.kw = a.get("kw");
  g.sh = a.get("sh");
  g.sw = a.get("sw");
  g.padh = a.get("padh");
  g.padw = a.get("padw");
  g.poolh = a.get("poolh");
  g.poolw = a.get("poolw");
  g.psh = a.get("psh");
  g.psw = a.get("psw");
  g.oh = (g.h + 2 * g.padh - g.kh) / g.sh + 1;
  g.ow = (g.w + 2 * g.padw - g.kw) / g.sw + 1;
  g.ph = (g.oh - g.poolh) / g.psh + 1;
  g.pw = (g.ow - g.poolw) / g.psw + 1;
  return g;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) fail("usage: sim_driver OP DIR key=value...");
  const std::string op = argv[1], dir = argv[2];
  Args a;
  for (int i = 3; i < argc; ++i) {
    const std::string s = argv[i];
    const auto eq = s.find('=');
    if (eq == std::string::npos) fail("expected key=value, got " + s);
    a.kv[s.substr(0, eq)] = s.substr(eq + 1);
  }
  const std::string dt = a.kv.count("dtype") ? a.kv.at("dtype") : "f32";
  DType dtype;
  size_t es;
  if (dt == "f32") {
    dtype = DType::kFloat32, es = 4;
  } else if (dt == "f64") {
    dtype = DType::kFloat64, es = 8;
  } else if (dt == "f16") {
    dtype = DType::kFloat16, es = 2;
  } else if (dt == "bf16") {
    dtype = DType::kBFloat16, es = 2;
  } else {
    fail("dtype must be f32, f64, f16 or bf16, got " + dt);
  }
  cudaStream_t stream = nullptr;

  if (op.rfind("conv_", 0) == 0) {
    const ConvGeom g = geometry(a);
    const size_t xs = g.n * g.c * g.h * g.w, ws = g.o * g.c * g.kh * g.kw;
    const size_t ps = g.n * g.o * g.ph * g.pw;
    if (op == "conv_fwd") {
      const auto x = read_file(dir, "x", xs * es), w = read_file(dir, "w", ws * es);
      const bool has_bias = a.get("bias", 0) != 0;
      const auto b = has_bias ? read_file(dir, "b", g.o * es) : std::vector<unsigned char>();
      auto out = poisoned(ps * es), am = poisoned(ps);
      check(fastlenet::cuda::conv_relu_pool_fwd(
          dtype, x.data(), w.data(), has_bias ? b.data() : nullptr, out.data(), am.data(), g,
          stream, a.get("smem", fastlenet::cuda::kConvSmemBudget)));
      write_file(dir, "out", out);
      write_file(dir, "argmax", am);
    } else if (op == "conv_bwd_input") {
      const auto go = read_file(dir, "go", ps * es), am = read_file(dir, "am", ps);
      const auto w = read_file(dir, "w", ws * es);
      auto gx = poisoned(xs * es);
      auto ws_buf = poisoned(fastlenet::cuda::conv_relu_pool_bwd_input_workspace(dtype, g));
      check(fastlenet::cuda::conv_relu_pool_bwd_input(dtype, go.data(), am.data(), w.data(),
                                                      gx.data(), ws_buf.data(), g, stream));
      write_file(dir, "gx", gx);
    } else if (op == "conv_bwd_weight") {
      const auto go = read_file(dir, "go", ps * es), am = read_file(dir, "am", ps);
      const auto x = read_file(dir, "x", xs * es);
      const bool atomics = a.get("atomics", 0) != 0;
      // Workspace poisoned too: the kernels must write (or zero) every partial they read.
      auto ws_buf =
          poisoned(fastlenet::cuda::conv_relu_pool_bwd_weight_workspace(dtype, g, atomics));
      auto gw = poisoned(ws * es), gb = poisoned(g.o * es);
      check(fastlenet::cuda::conv_relu_pool_bwd_weight(dtype, go.data(), am.data(), x.data(),
                                                       gw.data(), gb.data(), ws_buf.data(), g,
                                                       atomics, stream));
      write_file(dir, "gw", gw);
      write_file(dir, "gb", gb);
    } else {
      fail("unknown op " + op);
    }
    return 0;
  }

  const int64_t batch = a.get("batch"), in = a.get("in"), out_f = a.get("out");
  const bool relu = a.get("relu", 1) != 0;
  const int tile = static_cast<int>(a.get("tile", 0));
  const auto x = read_file(dir, "x", batch * in * es), w = read_file(dir, "w", out_f * in * es);
  if (op == "linear_fwd") {
    const bool has_bias = a.get("bias", 0) != 0;
    const auto b = has_bias ? read_file(dir, "b", out_f * es) : std::vector<unsigned char>();
    auto out = poisoned(batch * out_f * es);
    check(fastlenet::cuda::linear_relu_fwd(dtype, x.data(), w.data(), has_bias ? b.data() : nullptr,
                                           out.data(), batch, in, out_f, relu, stream, tile));
    write_file(dir, "out", out);
  } else if (op == "linear_bwd") {
    const auto go = read_file(dir, "go", batch * out_f * es);
    const auto out =
        relu ? read_file(dir, "out", batch * out_f * es) : std::vector<unsigned char>();
    auto gx = poisoned(batch * in * es), gw = poisoned(out_f * in * es), gb = poisoned(out_f * es);
    check(fastlenet::cuda::linear_relu_bwd(dtype, go.data(), relu ? out.data() : nullptr, x.data(),
                                           w.data(), gx.data(), gw.data(), gb.data(), batch, in,
                                           out_f, relu, stream, tile));
    write_file(dir, "gx", gx);
    write_file(dir, "gw", gw);
    write_file(dir, "gb", gb);
  } else {
    fail("unknown op " + op);
  }
  return 0;
}
