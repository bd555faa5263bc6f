// Dropout's noise on the CPU (csrc/dropout_cpu.cpp): what stock's dropout(like, p, train=True)
// multiplies `like` by, bit for bit, drawn from the default CPU generator as stock's draws it.
// Used by the dropout op (fastlenet/dropout.py, through the extension module) and by the chain's
// dropouts (csrc/chain_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fastlenet {

// p in (0, 1): stock's dropout draws no noise at 0 or 1.
at::Tensor dropout_noise(const at::Tensor& like, double p);

}  // namespace fastlenet
