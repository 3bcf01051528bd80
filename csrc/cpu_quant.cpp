// Weight-only quantized GEMMs for the decode step on the CPU: y = x @ w.T with float32 activations and
// w kept in 4 bits (Q4_1: w = scale * code + low, codes 0..15) or 8 bits (Q8_0: w = scale * code, codes
// -127..127) per group of 32 input columns, one float32 scale (and low) per group. The weights stay
// packed; each group is widened to float32 in registers, multiplied with the activations and scaled:
//   y[m, n] = sum_g scale[n, g] * dot(x[m, g], code[n, g]) + low[n, g] * sum(x[m, g]).
// Arithmetic is float32 throughout (no activation quantization, unlike llama.cpp's Q8_1 dot products), so
// a Q4_1/Q8_0 GGUF's weights are used exactly as its dequantized float32 tensors would be, up to the
// order of the additions. Output rows are split over torch's intra-op threads; up to kRowTile input rows
// share one widening of each weight group. AVX2 + FMA where the CPU has them (checked at run time),
// portable C++ elsewhere.
#include "cpu_quant.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace elastic_decode {
namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowTile = 4;
constexpr int64_t kOutGrain = 16;  // output rows per parallel task at least

struct Problem {
  const float* x;     // [rows, in]
  const float* xsum;  // [rows, groups]: each group's sum of x (Q4 only)
  const uint8_t* codes;
  const float* scale;  // [out, groups]
  const float* low;    // [out, groups] or null (Q8)
  float* y;            // [rows, out]
  int64_t rows, in, out, groups;
};

// One group's 32 weights as floats (portable path).
inline void widen(const Problem& p, bool q4, int64_t n, int64_t g, float* w) {
  if (q4) {
    const uint8_t* b = p.codes + (n * p.groups + g) * (kGroup / 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = static_cast<float>(b[j] & 0x0F);
      w[j + 16] = static_cast<float>(b[j] >> 4);
    }
  } else {
    const int8_t* b = reinterpret_cast<const int8_t*>(p.codes) + (n * p.groups + g) * kGroup;
    for (int j = 0; j < kGroup; ++j) w[j] = static_cast<float>(b[j]);
  }
}

void rows_portable(const Problem& p, bool q4, int64_t n0, int64_t n1) {
  float w[kGroup];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        widen(p, q4, n, g, w);
        const float* xg = p.x + m * p.in + g * kGroup;
        float dot = 0.0f;
        for (int j = 0; j < kGroup; ++j) dot += w[j] * xg[j];
        total += p.scale[n * p.groups + g] * dot;
        if (q4) total += p.low[n * p.groups + g] * p.xsum[m * p.groups + g];
      }
      p.y[m * p.out + n] = total;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// TILE input rows against output rows [n0, n1): each weight group widened once for the TILE rows.
template <bool Q4, int TILE>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const float* scale = p.scale + n * p.groups;
    __m256 acc[TILE];
    for (int t = 0; t < TILE; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256 w0, w1, w2, w3;  // columns 0-7, 8-15, 16-23, 24-31 of the group
      if constexpr (Q4) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + (n * p.groups + g) * 16));
        const __m128i lo = _mm_and_si128(raw, nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      } else {
        const uint8_t* b = p.codes + (n * p.groups + g) * kGroup;
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8))));
        w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 16))));
        w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 24))));
      }
      const __m256 s = _mm256_set1_ps(scale[g]);
      for (int t = 0; t < TILE; ++t) {
        const float* xg = p.x + (m0 + t) * p.in + g * kGroup;
        __m256 dot = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
        dot = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), dot);
        dot = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), dot);
        dot = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), dot);
        acc[t] = _mm256_fmadd_ps(dot, s, acc[t]);
      }
    }
    for (int t = 0; t < TILE; ++t) {
      float total = hsum(acc[t]);
      if constexpr (Q4) total += dot_avx2(p.low + n * p.groups, p.xsum + (m0 + t) * p.groups, p.groups);
      p.y[(m0 + t) * p.out + n] = total;
    }
  }
}

template <bool Q4>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + kRowTile <= p.rows; m0 += kRowTile) tile_avx2<Q4, kRowTile>(p, m0, n0, n1);
  switch (p.rows - m0) {
    case 3: return tile_avx2<Q4, 3>(p, m0, n0, n1);
    case 2: return tile_avx2<Q4, 2>(p, m0, n0, n1);
    case 1: return tile_avx2<Q4, 1>(p, m0, n0, n1);
    default: return;
  }
}

bool have_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
}

torch::Tensor run(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                  const torch::Tensor* low, bool simd) {
  const bool q4 = low != nullptr;
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "quantized linear: x must be a contiguous float32 CPU matrix");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(in % kGroup == 0, "quantized linear: the input width ", in, " is not a multiple of ", kGroup);
  const int64_t groups = in / kGroup;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == (q4 ? in / 2 : in) &&
                  codes.dtype() == (q4 ? torch::kUInt8 : torch::kInt8),
              "quantized linear: codes must be contiguous ", q4 ? "uint8 [out, in / 2]" : "int8 [out, in]");
  for (const torch::Tensor* t : {&scale, low}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->is_contiguous() && t->dtype() == torch::kFloat32 && t->dim() == 2 && t->size(0) == out &&
                    t->size(1) == groups,
                "quantized linear: scales must be contiguous float32 [out, in / 32]");
  }
  auto y = torch::empty({rows, out}, x.options());
  std::vector<float> xsum(q4 ? rows * groups : 0);  // each group's sum of x, for the low term
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    float total = 0.0f;
    for (int64_t j = 0; j < kGroup; ++j) total += xp[i * kGroup + j];
    xsum[i] = total;
  }
  const Problem p{xp, q4 ? xsum.data() : nullptr, static_cast<const uint8_t*>(codes.data_ptr()),
                  scale.data_ptr<float>(), q4 ? low->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                  rows, in, out, groups};
  const bool avx2 = simd && have_avx2();
  at::parallel_for(0, out, kOutGrain, [&](int64_t begin, int64_t end) {
    if (!avx2) return rows_portable(p, q4, begin, end);
    if (q4) return rows_avx2<true>(p, begin, end);
    rows_avx2<false>(p, begin, end);
  });
  return y;
}

}  // namespace

torch::Tensor q4_linear_cpu(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            const torch::Tensor& low, bool simd) {
  return run(x, codes, scale, &low, simd);
}

torch::Tensor q8_linear_cpu(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            bool simd) {
  return run(x, codes, scale, nullptr, simd);
}

}  // namespace elastic_decode
