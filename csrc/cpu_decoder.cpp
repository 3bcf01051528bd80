// Int4Decoder (cpu_decoder.h): the per-op decode forward of models/llama.py with kernels/cpu.py's int4 ops,
// step for step, without returning to Python between the ops. A batch-1 decode step of the embedded model
// spent about half its time in the Python around the C++ ops (some 170 calls per layer: RESULTS.md).
#include "cpu_decoder.h"

#include "cpu_attention.h"
#include "cpu_ops.h"
#include "cpu_quant.h"

namespace elastic_decode {
namespace {

// kernels/cpu.py:int4_linear on a float32 x: the 4-bit GEMM, then the bias added as torch adds it.
torch::Tensor linear(const torch::Tensor& x, const QuantizedLinear& w) {
  const auto& [codes, scale, low, bias] = w;
  torch::Tensor y = q4_linear_cpu(x.contiguous(), codes, scale, low);
  return bias ? y + *bias : y;
}

}  // namespace

Int4Decoder::Int4Decoder(int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t width, double scale)
    : q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim), width_(width), scale_(scale) {
  TORCH_CHECK(q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0 && head_dim > 0 && width > 0,
              "Int4Decoder: bad shape");
}

void Int4Decoder::add_layer(const torch::Tensor& in_norm, const torch::Tensor& post_norm, double eps,
                            const std::optional<torch::Tensor>& q_norm, const std::optional<torch::Tensor>& k_norm,
                            double head_eps, const QuantizedLinear& qkv, const QuantizedLinear& o,
                            const QuantizedLinear& gate_up, const QuantizedLinear& down) {
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "Int4Decoder: q_norm and k_norm come together");
  TORCH_CHECK(std::get<0>(qkv).size(0) == (q_heads_ + 2 * kv_heads_) * head_dim_ &&
                  std::get<0>(gate_up).size(0) == 2 * width_,
              "Int4Decoder: the qkv / gate_up GEMMs do not match the heads and width");
  layers_.push_back({in_norm, post_norm, eps, q_norm, k_norm, head_eps, qkv, o, gate_up, down});
}

std::tuple<torch::Tensor, torch::Tensor> Int4Decoder::forward(
    const torch::Tensor& x_in, const torch::Tensor& positions_in, const torch::Tensor& cos_table,
    const torch::Tensor& sin_table, const std::vector<torch::Tensor>& k_caches,
    const std::vector<torch::Tensor>& v_caches, const torch::Tensor& slot_mapping_in,
    const torch::Tensor& block_tables_in, const torch::Tensor& context_lens) const {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "Int4Decoder: x must be float32 [tokens, hidden]");
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
              "Int4Decoder: one (k, v) cache per layer");
  const int64_t n = x_in.size(0), d = head_dim_;
  const auto positions = positions_in.to(at::kLong).contiguous();
  const auto slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const auto block_tables = block_tables_in.contiguous();
  torch::Tensor x = x_in, residual, h;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& L = layers_[i];
    if (i == 0) {
      h = std::get<0>(rms_norm_cpu(x, L.in_norm, L.eps, std::nullopt));
      residual = x;
    } else {
      std::tie(h, residual) = rms_norm_cpu(x, L.in_norm, L.eps, residual);
    }
    const torch::Tensor qkv = linear(h, L.qkv);  // views of its columns, as the model's split
    const torch::Tensor q = qkv.narrow(1, 0, q_heads_ * d).view({n, q_heads_, d});
    const torch::Tensor k = qkv.narrow(1, q_heads_ * d, kv_heads_ * d).view({n, kv_heads_, d});
    const torch::Tensor v = qkv.narrow(1, (q_heads_ + kv_heads_) * d, kv_heads_ * d).view({n, kv_heads_, d});
    const torch::Tensor rotated = rope_write_kv_cpu(q, k, v, positions, cos_table, sin_table, k_caches[i], v_caches[i],
                                                    slot_mapping, L.q_norm, L.k_norm, L.q_norm ? L.head_eps : 0.0);
    const torch::Tensor o = paged_decode_attention_cpu(rotated, k_caches[i], v_caches[i], block_tables, context_lens,
                                                       scale_);
    std::tie(h, residual) = rms_norm_cpu(linear(o.reshape({n, -1}), L.o), L.post_norm, L.eps, residual);
    const torch::Tensor gate_up = linear(h, L.gate_up);
    x = linear(at::silu(gate_up.narrow(1, 0, width_)) * gate_up.narrow(1, width_, width_), L.down);
  }
  return {x, residual};
}

}  // namespace elastic_decode
