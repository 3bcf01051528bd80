// The decoder layers of a decode step in one call, for LLM(quantization="int4") on the CPU backend.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace elastic_decode {

// One GEMM's 4-bit weights as kernels/cpu.py:_q4 lays them out (codes, scale, low: cpu_quant.h) and its bias.
using QuantizedLinear = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, std::optional<torch::Tensor>>;

// A Llama-family decoder (models/llama.py: DecoderLayer) on float32 activations and 4-bit weights. Each
// layer runs the C++ ops the model's per-op forward calls through kernels/cpu.py, in its order, on the
// same tensors (the same views, the same bias adds), so its numbers are that forward's; only the Python
// between the ops is gone.
class Int4Decoder {
 public:
  Int4Decoder(int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t width, double scale);

  // in_norm/post_norm: the layer's RMSNorm weights (eps); q_norm/k_norm: Qwen3's head norms (head_eps).
  void add_layer(const torch::Tensor& in_norm, const torch::Tensor& post_norm, double eps,
                 const std::optional<torch::Tensor>& q_norm, const std::optional<torch::Tensor>& k_norm,
                 double head_eps, const QuantizedLinear& qkv, const QuantizedLinear& o, const QuantizedLinear& gate_up,
                 const QuantizedLinear& down);

  // x [tokens, hidden] (the embeddings) through every layer of one decode step (one token per sequence):
  // returns (the last layer's MLP output, the residual stream before it), as the per-op forward's loop.
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& positions,
                                                   const torch::Tensor& cos_table, const torch::Tensor& sin_table,
                                                   const std::vector<torch::Tensor>& k_caches,
                                                   const std::vector<torch::Tensor>& v_caches,
                                                   const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                                                   const torch::Tensor& context_lens) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  struct Layer {
    torch::Tensor in_norm, post_norm;
    double eps;
    std::optional<torch::Tensor> q_norm, k_norm;
    double head_eps;
    QuantizedLinear qkv, o, gate_up, down;
  };
  int64_t q_heads_, kv_heads_, head_dim_, width_;
  double scale_;
  std::vector<Layer> layers_;
};

}  // namespace elastic_decode
