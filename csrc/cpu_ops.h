// Fused elementwise ops of the decode step on the CPU (cpu_ops.cpp): the rms_norm and rope_write_kv
// contracts of DESIGN.md, each one pass over its rows where the torch reference runs 6 and about 25 ops.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace elastic_decode {

// x, residual [rows, hidden] (row stride free, columns contiguous), weight [hidden], all one dtype.
// Returns (normed, residual + x); normed alone (and an undefined second tensor) without a residual.
std::tuple<torch::Tensor, torch::Tensor> rms_norm_cpu(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                                      const std::optional<torch::Tensor>& residual);

// q [tokens, q heads, d], k and v [tokens, kv heads, d] (head rows contiguous), positions and slot_mapping
// int64 [tokens], cos/sin tables fp32 [positions, d], caches [blocks, block_size, kv heads, d] of q's dtype.
// Returns the rotated q (contiguous); writes rotated k and v at each slot >= 0.
torch::Tensor rope_write_kv_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& positions, const torch::Tensor& cos_table,
                                const torch::Tensor& sin_table, const torch::Tensor& k_cache,
                                const torch::Tensor& v_cache, const torch::Tensor& slot_mapping,
                                const std::optional<torch::Tensor>& q_norm, const std::optional<torch::Tensor>& k_norm,
                                double eps);

}  // namespace elastic_decode
