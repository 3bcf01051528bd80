// Weight-only quantized GEMMs for the decode step on the CPU: y = x @ w.T with w kept in 4 bits (Q4_1:
// w = scale * code + low, codes 0..15) or 8 bits (Q8_0: w = scale * code, codes -127..127) per group of 32
// input columns, one float32 scale (and low) per group. The weights stay packed.
//
// The activations are quantized per group of 32 too, to 16-bit integer codes: x ~ xd * xq, xd = max|x| /
// 32767 (a rounding of 2^-16 of the group's largest magnitude, 256 times finer than the 8-bit codes
// llama.cpp's Q8_1 dot products use, which cost the embedded model 5% of its argmax tokens against 0 here:
// benchmarks/quant_agreement.py). Then each group's dot product is exact integer arithmetic (vpmaddwd):
//   y[m, n] = sum_g scale[n, g] * xd[m, g] * dot(code[n, g], xq[m, g]) + low[n, g] * sum(x[m, g]),
// the low term on the float32 sums of x. Widening a 4-bit group to 16-bit integers takes 3 instructions after
// its load where widening it to float32 took 12: the widening bounds this loop on AVX2 (RESULTS.md).
// Output rows are split over torch's intra-op threads; up to kRowTile input rows share one widening of each
// weight group. AVX2 where the CPU has it (checked at run time), portable C++ elsewhere, the same integers.
#include "cpu_quant.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace elastic_decode {
namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowTile = 4;
constexpr int64_t kOutGrain = 16;  // output rows per parallel task at least
constexpr float kCodeMax = 32767.0f;

struct Problem {
  const int16_t* xq;  // [rows, in]: the activations' codes
  const float* xd;    // [rows, groups]: their scales
  const float* xsum;  // [rows, groups]: each group's float32 sum of x (Q4 only)
  const uint8_t* codes;
  const float* scale;  // [out, groups]
  const float* low;    // [out, groups] or null (Q8)
  float* y;            // [rows, out]
  int64_t rows, in, out, groups;
};

void rows_portable(const Problem& p, bool q4, int64_t n0, int64_t n1) {
  int32_t w[kGroup];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) {
      float total = 0.0f, lows = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        if (q4) {
          const uint8_t* b = p.codes + (n * p.groups + g) * (kGroup / 2);
          for (int j = 0; j < 16; ++j) w[j] = b[j] & 0x0F, w[j + 16] = b[j] >> 4;
        } else {
          const int8_t* b = reinterpret_cast<const int8_t*>(p.codes) + (n * p.groups + g) * kGroup;
          for (int j = 0; j < kGroup; ++j) w[j] = b[j];
        }
        const int16_t* xg = p.xq + m * p.in + g * kGroup;
        int32_t dot = 0;
        for (int j = 0; j < kGroup; ++j) dot += w[j] * xg[j];
        total += p.scale[n * p.groups + g] * p.xd[m * p.groups + g] * static_cast<float>(dot);
        if (q4) lows += p.low[n * p.groups + g] * p.xsum[m * p.groups + g];
      }
      p.y[m * p.out + n] = total + lows;
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

// The weights stream from memory once per token: the hardware prefetcher alone left a cold GEMM at 12 of
// the 33 GB/s two cores read (RESULTS.md), so each row asks for the one kPrefetchRows ahead.
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kLine = 64;

inline void prefetch_row(const Problem& p, int64_t n, int64_t code_bytes) {
  const char* codes = reinterpret_cast<const char*>(p.codes) + n * code_bytes;
  for (int64_t i = 0; i < code_bytes; i += kLine) _mm_prefetch(codes + i, _MM_HINT_T0);
  for (const float* t : {p.scale, p.low}) {
    if (t == nullptr) continue;
    const char* row = reinterpret_cast<const char*>(t + n * p.groups);
    for (int64_t i = 0; i < p.groups * 4; i += kLine) _mm_prefetch(row + i, _MM_HINT_T0);
  }
}

// TILE input rows against output rows [n0, n1): each weight group widened once for the TILE rows.
template <bool Q4, int TILE>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  const int64_t code_bytes = p.groups * (Q4 ? kGroup / 2 : kGroup);
  for (int64_t n = n0; n < n1; ++n) {
    if (n + kPrefetchRows < n1) prefetch_row(p, n + kPrefetchRows, code_bytes);
    const float* scale = p.scale + n * p.groups;
    __m256 acc[TILE];
    for (int t = 0; t < TILE; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256i w0, w1;  // columns 0-15 and 16-31 of the group as int16
      if constexpr (Q4) {  // byte j holds column j (low nibble) and column j + 16 (high)
        const __m256i bytes = _mm256_cvtepu8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + (n * p.groups + g) * 16)));
        w0 = _mm256_and_si256(bytes, nibble);
        w1 = _mm256_srli_epi16(bytes, 4);
      } else {
        const uint8_t* b = p.codes + (n * p.groups + g) * kGroup;
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
      }
      const __m256 s = _mm256_broadcast_ss(scale + g);
      for (int t = 0; t < TILE; ++t) {
        const int16_t* xg = p.xq + (m0 + t) * p.in + g * kGroup;
        // 8 lanes of 4 products each: at most 4 * 127 * 32767 < 2^24, exact as int32 and as float32
        const __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16))));
        const __m256 sx = _mm256_mul_ps(s, _mm256_broadcast_ss(p.xd + (m0 + t) * p.groups + g));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sx, acc[t]);
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

// Each group of 32 activations as 16-bit codes and a scale (and its float32 sum), the rounding
// kernels/cpu.py:quantize_activations writes in torch: d = max|x| / 32767, code = round-half-even(x * (1 / d)).
void quantize_portable(const float* x, int64_t count, int16_t* q, float* d, float* sum) {
  for (int64_t i = 0; i < count; ++i) {
    const float* xg = x + i * kGroup;
    float amax = 0.0f, total = 0.0f;
    for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(xg[j])), total += xg[j];
    const float scale = amax / kCodeMax, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int j = 0; j < kGroup; ++j)
      q[i * kGroup + j] = static_cast<int16_t>(std::clamp(std::nearbyint(xg[j] * inverse), -kCodeMax, kCodeMax));
    d[i] = scale;
    sum[i] = total;
  }
}

// The same codes (vcvtps2dq rounds half to even; |x * (1 / d)| stays within 32767 + a rounding, which
// rounds to 32767), a libm call per element fewer.
__attribute__((target("avx2,fma"))) void quantize_avx2(const float* x, int64_t count, int16_t* q, float* d,
                                                        float* sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < count; ++i) {
    const float* xg = x + i * kGroup;
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(xg + 8 * k);
    const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                                       _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = amax / kCodeMax, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    const __m256 inv = _mm256_set1_ps(inverse);
    __m256i c[4];
    for (int k = 0; k < 4; ++k) c[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));
    // packs interleaves 128-bit lanes: columns 0-3, 8-11, 4-7, 12-15; the permute puts them back in order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kGroup),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kGroup + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
    d[i] = scale;
    sum[i] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  }
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
  std::vector<int16_t> xq(rows * in);
  std::vector<float> xd(rows * groups), xsum(rows * groups);
  const bool avx2 = simd && have_avx2();
  (avx2 ? quantize_avx2 : quantize_portable)(x.data_ptr<float>(), rows * groups, xq.data(), xd.data(), xsum.data());
  const Problem p{xq.data(), xd.data(), xsum.data(), static_cast<const uint8_t*>(codes.data_ptr()),
                  scale.data_ptr<float>(), q4 ? low->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                  rows, in, out, groups};
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
