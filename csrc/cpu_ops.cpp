// RMSNorm (+ the residual add before it) and RoPE + the K/V cache write, fused, on the CPU.
//
// The numbers are the torch reference's (kernels/reference.py) in its order of roundings: a value the
// reference holds in the model dtype is rounded to it here at the same point (bf16/fp16 through float), the
// statistics are fp32. Only the sum of squares is added in another order than torch's reduction, so fp32
// results agree to an ulp or two, and now and then a bf16/fp16 value rounds the other way (tests/test_kernels_cpu.py). One pass per row; rows (tokens) run on torch's
// intra-op pool once there are enough of them to pay for it.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace elastic_decode {
namespace {

template <typename T>
inline float f(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline float round_to(float x) {  // the value of x once stored in T
  return static_cast<float>(static_cast<T>(x));
}

constexpr int64_t kRowGrain = 8;  // rows per task of the thread pool: decode's few rows stay on one thread

template <typename T>
float inv_rms(const float* x, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

template <typename T>
void rms_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, float eps, const torch::Tensor* residual,
                   torch::Tensor& out, torch::Tensor* sum_out) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* sp = sum_out ? sum_out->data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        // residual + x in the model dtype, as the reference adds them
        row[i] = rp ? round_to<T>(f(rp[r * rs + i]) + f(xp[r * xs + i])) : f(xp[r * xs + i]);
        if (sp) sp[r * n + i] = static_cast<T>(row[i]);
      }
      const float inv = inv_rms<T>(row.data(), n, eps);
      for (int64_t i = 0; i < n; ++i) op[r * n + i] = static_cast<T>(f(wp[i]) * round_to<T>(row[i] * inv));
    }
  });
}

// One head of one token: (Qwen3's head RMSNorm,) rotate-half RoPE, into dst (T elements).
template <typename T>
inline void rotate_head(const T* src, T* dst, int64_t d, const float* cos, const float* sin, const T* norm, float eps,
                        float* x) {
  for (int64_t i = 0; i < d; ++i) x[i] = f(src[i]);
  if (norm) {
    const float inv = inv_rms<T>(x, d, eps);
    for (int64_t i = 0; i < d; ++i) x[i] = round_to<T>(f(norm[i]) * round_to<T>(x[i] * inv));
  }
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -x[i + half] : x[i - half];
    dst[i] = static_cast<T>(round_to<T>(x[i] * cos[i]) + round_to<T>(rotated * sin[i]));
  }
}

template <typename T>
void rope_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& positions,
               const torch::Tensor& cos_table, const torch::Tensor& sin_table, const torch::Tensor& k_cache,
               const torch::Tensor& v_cache, const torch::Tensor& slots, const T* q_norm, const T* k_norm, float eps,
               torch::Tensor& q_out) {
  const int64_t tokens = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  const float *cos_p = cos_table.data_ptr<float>(), *sin_p = sin_table.data_ptr<float>();
  T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>(), *out = q_out.data_ptr<T>();
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> cos(d), sin(d), x(d);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < d; ++i) {  // the tables' rows rounded to the model dtype, as the reference does
        cos[i] = round_to<T>(cos_p[pos[t] * d + i]);
        sin[i] = round_to<T>(sin_p[pos[t] * d + i]);
      }
      for (int64_t h = 0; h < hq; ++h)
        rotate_head<T>(qp + t * q.stride(0) + h * q.stride(1), out + (t * hq + h) * d, d, cos.data(), sin.data(),
                       q_norm, eps, x.data());
      if (slot[t] < 0) continue;  // a row that writes no K/V (a finished row of a multi-step chunk)
      for (int64_t h = 0; h < hkv; ++h) {
        T* kdst = kc + (slot[t] * hkv + h) * d;
        rotate_head<T>(kp + t * k.stride(0) + h * k.stride(1), kdst, d, cos.data(), sin.data(), k_norm, eps, x.data());
        const T* vsrc = vp + t * v.stride(0) + h * v.stride(1);
        std::copy(vsrc, vsrc + d, vc + (slot[t] * hkv + h) * d);
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dimension must be contiguous");
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> rms_norm_cpu(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                                      const std::optional<torch::Tensor>& residual) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: x [rows, hidden] and a contiguous weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x must share a dtype");
  if (residual) {
    check_rows(*residual, "rms_norm residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must be like x");
  }
  auto out = torch::empty(x.sizes(), x.options());
  torch::Tensor sum = residual ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
  const float e = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(x, weight, e, residual ? &*residual : nullptr, out, residual ? &sum : nullptr);
  });
  return {out, sum};
}

torch::Tensor rope_write_kv_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& positions, const torch::Tensor& cos_table,
                                const torch::Tensor& sin_table, const torch::Tensor& k_cache,
                                const torch::Tensor& v_cache, const torch::Tensor& slot_mapping,
                                const std::optional<torch::Tensor>& q_norm, const std::optional<torch::Tensor>& k_norm,
                                double eps) {
  for (auto* t : {&q, &k, &v}) {
    check_rows(*t, "rope_write_kv q/k/v");
    TORCH_CHECK(t->dim() == 3 && t->stride(1) == t->size(2), "rope_write_kv: q/k/v [tokens, heads, d], heads contiguous");
  }
  const int64_t d = q.size(2);
  TORCH_CHECK(k.size(2) == d && v.sizes() == k.sizes() && k.size(0) == q.size(0) && d % 2 == 0,
              "rope_write_kv: q, k, v must agree on tokens and an even head_dim");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "rope_write_kv: q, k, v and the caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.size(2) == k.size(1) && k_cache.size(3) == d,
              "rope_write_kv: contiguous caches [blocks, block_size, kv heads, head_dim]");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                  cos_table.is_contiguous() && sin_table.is_contiguous() && cos_table.size(1) == d,
              "rope_write_kv: contiguous fp32 cos/sin tables [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slot_mapping.is_contiguous(),
              "rope_write_kv: contiguous int64 positions and slot_mapping");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "rope_write_kv: q_norm and k_norm come together");
  if (q_norm) {
    TORCH_CHECK(q_norm->is_contiguous() && k_norm->is_contiguous() && q_norm->numel() == d && k_norm->numel() == d &&
                    q_norm->scalar_type() == q.scalar_type() && k_norm->scalar_type() == q.scalar_type(),
                "rope_write_kv: q_norm and k_norm [head_dim] in q's dtype");
  }
  auto q_out = torch::empty({q.size(0), q.size(1), d}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_write_kv_cpu", [&] {
    rope_rows<scalar_t>(q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
                        q_norm ? q_norm->data_ptr<scalar_t>() : nullptr, k_norm ? k_norm->data_ptr<scalar_t>() : nullptr,
                        static_cast<float>(eps), q_out);
  });
  return q_out;
}

}  // namespace elastic_decode
