// Paged attention on the CPU (cpu_attention.cpp): the kernel contracts of DESIGN.md.
#pragma once

#include <torch/extension.h>

namespace elastic_decode {

// q [num_seqs, num_q_heads, head_dim]: each sequence's one new token, at position context_lens - 1.
torch::Tensor paged_decode_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                         const torch::Tensor& context_lens, double scale);

// q [num_tokens, num_q_heads, head_dim]: packed new tokens (cu_seqlens_q), the last rows of each context.
torch::Tensor paged_prefill_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                          const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                          const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens,
                                          double scale);

}  // namespace elastic_decode
