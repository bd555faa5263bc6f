#!/usr/bin/env bash
# `make sanitize`: the C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# 1. Builds fastlenet (FASTLENET_SANITIZE=1, FASTLENET_CUDA=0) into build/sanitize/lib, apart
#    from the normal in-place build, which stays untouched.
# 2. Proves the sanitizers are live: a planted heap overflow and a planted signed overflow,
#    compiled with the same flags, must each be reported; the sanitized _C must link them.
# 3. Runs the op test suites against that build, with the ASan runtime preloaded into Python
#    (it must be the first library loaded), and libstdc++ right after it: python does not link
#    libstdc++, and without it ASan cannot find the real __cxa_throw, so the first C++
#    exception (any TORCH_CHECK) would abort. Leak detection is off: CPython frees little at
#    exit by design. Any report aborts the run, so the suites pass only when nothing was found.
#    Triton is switched off (TRITON_INTERPRET=0): libtriton carries its own static C++ runtime,
#    which ASan's exception interceptor cannot handle, and it runs no fastlenet C++ anyway.
#
# Usage: tests/run_sanitized.sh [PYTHON] [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
OUT=build/sanitize
# The same sanitizer flags as setup.py's FASTLENET_SANITIZE=1.
SAN_FLAGS=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -O1 -g)
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so)
if [[ ! -e $LIBASAN ]]; then
  echo "run_sanitized: libasan.so not found (install gcc's libasan)" >&2
  exit 1
fi
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

echo "== build (ASan + UBSan, CPU only) into $OUT/lib"
mkdir -p "$OUT"
FASTLENET_SANITIZE=1 FASTLENET_CUDA=0 "$PY" setup.py -q build \
  --build-base "$OUT/base" --build-lib "$OUT/lib" --build-temp "$OUT/temp" > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; exit 1; }
SO=$(ls "$OUT"/lib/fastlenet/_C*.so)
# ldd's output is read whole before grep: `ldd | grep -q` under pipefail fails at random, when
# grep exits at its first match while ldd still writes (SIGPIPE, exit 141).
LINKED=$(ldd "$SO")
if ! grep -q libasan <<< "$LINKED" || ! grep -q libubsan <<< "$LINKED"; then
  echo "run_sanitized: $SO is not linked with libasan and libubsan" >&2
  exit 1
fi

echo "== the sanitizers catch planted bugs"
cat > "$OUT/canary.cpp" <<'EOF'
// Planted bugs: argv[1] picks one. The index and the operand come from the command line, so
// the compiler cannot see the bug at build time.
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>
int main(int argc, char** argv) {
  const int k = std::atoi(argv[2]);
  if (argv[1][0] == 'a') {  // heap buffer overflow: one past the end of 8 floats
    std::vector<float> v(8, 1.0f);
    std::printf("%f\n", v.data()[k]);
  } else {  // signed integer overflow
    const int big = INT_MAX - 1;
    std::printf("%d\n", big + k);
  }
  return 0;
}
EOF
g++ "${SAN_FLAGS[@]}" -o "$OUT/canary" "$OUT/canary.cpp"
expect_report() {  # expect_report PATTERN ARGS...: the canary must fail with PATTERN in stderr
  local pattern=$1
  shift
  if "$OUT/canary" "$@" > /dev/null 2> "$OUT/canary.err"; then
    echo "run_sanitized: planted bug '$*' ran without a sanitizer report" >&2
    exit 1
  fi
  grep -q "$pattern" "$OUT/canary.err" || {
    cat "$OUT/canary.err" >&2
    echo "run_sanitized: no '$pattern' report for planted bug '$*'" >&2
    exit 1
  }
  echo "   planted '$*': $pattern"
}
expect_report "AddressSanitizer: heap-buffer-overflow" a 8
expect_report "runtime error: signed integer overflow" u 2
"$OUT/canary" a 7 > /dev/null  # and in-bounds code runs clean

echo "== op test suites against the sanitized build"
run() { LD_PRELOAD="$LIBASAN $LIBSTDCXX" TRITON_INTERPRET=0 PYTHONPATH="$OUT/lib" "$PY" -P "$@"; }
# -P: no current directory on sys.path, so `fastlenet` is the sanitized copy, not the source tree.
LOADED=$(run -c "import fastlenet._ext as e; print(e._C.__file__)")
case $LOADED in
  "$PWD/$OUT/lib/"*) echo "   fastlenet._C from $LOADED" ;;
  *) echo "run_sanitized: loaded $LOADED, not the sanitized build" >&2; exit 1 ;;
esac
# Triton's cases are left to `make test` (see above).
run -m pytest -q -p no:cacheprovider -k "not triton" \
  tests/test_conv_relu_pool.py tests/test_conv_relu_pool_cpu.py tests/test_linear_relu.py \
  tests/test_linear_relu_cpu.py tests/test_ops.py tests/test_bad_input_functions.py \
  tests/test_bad_input_layers.py \
  tests/test_bad_input_ops.py tests/test_edge_cases.py tests/test_chain.py tests/test_autograd_nodes.py \
  tests/test_dropout.py tests/test_chain_dropout.py "$@"
