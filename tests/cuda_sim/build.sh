#!/usr/bin/env bash
# Builds the CUDA simulator programs from csrc/*_cuda.cu (compiled as C++ against cuda_sim.h):
#   tests/cuda_sim/build.sh [plain|tsan]
# -> tests/cuda_sim/build/sim_driver[-tsan] and race_demo[-tsan]. A program is rebuilt only
# when a source is newer. CXX overrides the compiler (default g++; C++20 and <barrier> needed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
variant=${1:-plain}
case $variant in
  plain) flags=(-O1) suffix="" ;;
  tsan) flags=(-O1 -fsanitize=thread) suffix="-tsan" ;;
  *) echo "usage: $0 [plain|tsan]" >&2; exit 1 ;;
esac
cxx=${CXX:-g++}
out=$here/build
mkdir -p "$out"
common=(-std=c++20 -g -Wall -Wextra -DFASTLENET_CUDA_SIM "-I$here" "-I$root/csrc" -pthread)
cuda_sources=("$root"/csrc/*_cuda.cu)
deps=("${cuda_sources[@]}" "$root"/csrc/*.cuh "$root/csrc/cuda_launchers.h" "$here"/*.h
  "$here"/*.cpp "$here/build.sh")

stale() {  # stale TARGET: true when TARGET is missing or older than a dependency
  [[ -e $1 ]] || return 0
  for d in "${deps[@]}"; do [[ $d -nt $1 ]] && return 0; done
  return 1
}

if stale "$out/sim_driver$suffix"; then
  "$cxx" "${common[@]}" "${flags[@]}" -x c++ "${cuda_sources[@]}" -x none "$here/sim_driver.cpp" \
    -o "$out/sim_driver$suffix.tmp"
  mv "$out/sim_driver$suffix.tmp" "$out/sim_driver$suffix"
fi
if stale "$out/race_demo$suffix"; then
  "$cxx" "${common[@]}" "${flags[@]}" "$here/race_demo.cpp" -o "$out/race_demo$suffix.tmp"
  mv "$out/race_demo$suffix.tmp" "$out/race_demo$suffix"
fi
