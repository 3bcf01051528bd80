// Philox-4x32-10 uniforms on the CPU (cpu_philox.cpp): the sampler's random numbers, bit for bit those
// of Triton's tl.rand(seed, offset), which the GPU sampler draws and kernels/reference.py reproduces.
#pragma once

#include <torch/extension.h>

namespace elastic_decode {

// seed int64 [n] (non-negative), offset int32/int64 [n] (below 2**32) -> float32 [n] in [0, 1).
torch::Tensor philox_uniform_cpu(const torch::Tensor& seed, const torch::Tensor& offset);

}  // namespace elastic_decode
