// Paged attention on the CPU: the decode and prefill kernel contracts of DESIGN.md, in C++.
//
// One work item is a tile of query rows of one sequence and one kv head: every query head of the
// group that shares the kv head, for up to TILE query tokens. It streams the sequence's K/V block by
// block (each block read once for the whole tile, which is what GQA and prefill tiles save), and
// keeps an online softmax per (query token, head) in fp32 (flash attention's rescaling, once per
// block). Work items run on torch's intra-op thread pool (at::parallel_for). The inner loops are
// plain loops the compiler vectorises; the tile functions are compiled for AVX-512, AVX2+FMA and
// the baseline, and the CPU picks one at load time (GCC target_clones), so one build runs anywhere.
// fp32, bf16 and fp16 caches; the math is fp32 whatever the cache dtype, the output is q's dtype.
#include "cpu_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace elastic_decode {
namespace {

constexpr int TILE = 16;  // query tokens per prefill work item

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// A tile of `rows` query tokens x `group` heads against one kv head of one sequence.
struct Tile {
  const void* q;           // first query row of the tile: [rows][num_q_heads][d], this kv head's group at kv_head * group
  int64_t q_row_stride;    // elements between query tokens
  int rows;
  const int64_t* last;     // per row: the last key position it sees (its own position)
  int group, d, kv_head, block_size;
  const void* k_cache;     // [num_blocks][block_size][num_kv_heads][d]
  const void* v_cache;
  int64_t block_stride, token_stride;  // elements between blocks / tokens of the cache
  const int32_t* table;    // the sequence's block table
  float scale;
  void* out;               // like q
  int64_t out_row_stride;
};

template <typename T>
__attribute__((always_inline)) inline void attend(const Tile& t) {
  const int d = t.d, heads = t.rows * t.group, bs = t.block_size;
  std::vector<float> q(static_cast<size_t>(heads) * d), acc(static_cast<size_t>(heads) * d, 0.0f);
  std::vector<float> m(heads, -std::numeric_limits<float>::infinity()), l(heads, 0.0f);
  std::vector<float> s(static_cast<size_t>(heads) * bs), kf(static_cast<size_t>(bs) * d), vf(static_cast<size_t>(bs) * d);
  const T* qp = static_cast<const T*>(t.q);
  int64_t last = 0;
  for (int r = 0; r < t.rows; ++r) {
    last = std::max(last, t.last[r]);
    for (int g = 0; g < t.group; ++g) {
      const T* src = qp + r * t.q_row_stride + (static_cast<int64_t>(t.kv_head) * t.group + g) * d;
      float* dst = q.data() + (static_cast<size_t>(r) * t.group + g) * d;
      for (int i = 0; i < d; ++i) dst[i] = to_float(src[i]) * t.scale;
    }
  }
  const T* kc = static_cast<const T*>(t.k_cache);
  const T* vc = static_cast<const T*>(t.v_cache);
  for (int64_t start = 0; start <= last; start += bs) {
    const int n = static_cast<int>(std::min<int64_t>(bs, last + 1 - start));
    const int64_t base = static_cast<int64_t>(t.table[start / bs]) * t.block_stride + static_cast<int64_t>(t.kv_head) * d;
    for (int j = 0; j < n; ++j) {  // the block's keys and values, once, in fp32
      const T* k = kc + base + j * t.token_stride;
      const T* v = vc + base + j * t.token_stride;
      float* kd = kf.data() + static_cast<size_t>(j) * d;
      float* vd = vf.data() + static_cast<size_t>(j) * d;
      for (int i = 0; i < d; ++i) kd[i] = to_float(k[i]);
      for (int i = 0; i < d; ++i) vd[i] = to_float(v[i]);
    }
    for (int h = 0; h < heads; ++h) {
      const int r = h / t.group;
      const int visible = static_cast<int>(std::min<int64_t>(n, t.last[r] + 1 - start));  // causal: keys <= its position
      if (visible <= 0) continue;
      const float* qh = q.data() + static_cast<size_t>(h) * d;
      float* sh = s.data() + static_cast<size_t>(h) * bs;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < visible; ++j) {
        const float* kd = kf.data() + static_cast<size_t>(j) * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < d; ++i) dot += qh[i] * kd[i];
        sh[j] = dot;
        block_max = std::max(block_max, dot);
      }
      const float new_max = std::max(m[h], block_max);
      const float correction = std::exp(m[h] - new_max);  // 0 on the first block (m = -inf)
      float* ah = acc.data() + static_cast<size_t>(h) * d;
      float sum = 0.0f;
      if (correction != 1.0f) {
#pragma omp simd
        for (int i = 0; i < d; ++i) ah[i] *= correction;
      }
      for (int j = 0; j < visible; ++j) {
        const float p = std::exp(sh[j] - new_max);
        sum += p;
        const float* vd = vf.data() + static_cast<size_t>(j) * d;
#pragma omp simd
        for (int i = 0; i < d; ++i) ah[i] += p * vd[i];
      }
      l[h] = l[h] * correction + sum;
      m[h] = new_max;
    }
  }
  T* op = static_cast<T*>(t.out);
  for (int r = 0; r < t.rows; ++r) {
    for (int g = 0; g < t.group; ++g) {
      const int h = r * t.group + g;
      const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
      T* dst = op + r * t.out_row_stride + (static_cast<int64_t>(t.kv_head) * t.group + g) * d;
      const float* ah = acc.data() + static_cast<size_t>(h) * d;
      for (int i = 0; i < d; ++i) dst[i] = static_cast<T>(ah[i] * inv);
    }
  }
}

#define ED_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
ED_CLONES void attend_f32(const Tile& t) { attend<float>(t); }
ED_CLONES void attend_bf16(const Tile& t) { attend<at::BFloat16>(t); }
ED_CLONES void attend_f16(const Tile& t) { attend<at::Half>(t); }

void attend_any(at::ScalarType dtype, const Tile& t) {
  switch (dtype) {
    case at::kFloat: return attend_f32(t);
    case at::kBFloat16: return attend_bf16(t);
    case at::kHalf: return attend_f16(t);
    default: TORCH_CHECK(false, "paged attention on CPU supports float32, bfloat16 and float16, got ", dtype);
  }
}

void check(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
           const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad q or cache shape");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "q and cache head_dim differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_q_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q heads must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: contiguous int32");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt, "context_lens must be int32");
}

Tile base_tile(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, double scale,
               torch::Tensor& out) {
  Tile t{};
  t.group = static_cast<int>(q.size(1) / k_cache.size(2));
  t.d = static_cast<int>(q.size(2));
  t.block_size = static_cast<int>(k_cache.size(1));
  t.k_cache = k_cache.data_ptr();
  t.v_cache = v_cache.data_ptr();
  t.block_stride = k_cache.stride(0);
  t.token_stride = k_cache.stride(1);
  t.scale = static_cast<float>(scale);
  t.q_row_stride = q.stride(0);
  t.out_row_stride = out.stride(0);
  return t;
}

// Every (work item, kv head) on torch's thread pool. An item is (sequence, first query row, rows);
// last[row] is the last key position that query row sees (its own position).
using Item = std::array<int64_t, 3>;

torch::Tensor run_items(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& block_tables, double scale, const std::vector<Item>& items,
                        const std::vector<int64_t>& last) {
  auto out = torch::empty_like(q, at::MemoryFormat::Contiguous);
  const Tile shape = base_tile(q, k_cache, v_cache, scale, out);
  const int64_t kv_heads = k_cache.size(2), item_size = q.element_size();
  const auto dtype = q.scalar_type();
  const char* qp = static_cast<const char*>(q.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, num_items * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const auto& [i, row, rows] = items[w / kv_heads];
      Tile t = shape;
      t.rows = static_cast<int>(rows);
      t.kv_head = static_cast<int>(w % kv_heads);
      t.last = &last[row];
      t.q = qp + row * q.stride(0) * item_size;
      t.out = op + row * out.stride(0) * item_size;
      t.table = tables + i * table_stride;
      attend_any(dtype, t);  // (an empty context writes zeros)
    }
  });
  return out;
}

}  // namespace

torch::Tensor paged_decode_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                         const torch::Tensor& context_lens, double scale) {
  check(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t num_seqs = q.size(0);
  auto lens = context_lens.to(at::kLong).contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  std::vector<Item> items(num_seqs);
  std::vector<int64_t> last(num_seqs);
  for (int64_t i = 0; i < num_seqs; ++i) {
    items[i] = {i, i, 1};  // one query row per sequence, at position len - 1
    last[i] = len[i] - 1;
  }
  return run_items(q, k_cache, v_cache, block_tables, scale, items, last);
}

torch::Tensor paged_prefill_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                          const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                          const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens,
                                          double scale) {
  check(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t num_seqs = context_lens.size(0);
  auto cu = cu_seqlens_q.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  const int64_t* cup = cu.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  std::vector<Item> items;  // tiles of up to TILE new tokens of one sequence
  std::vector<int64_t> last(q.size(0));
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t lo = cup[i], hi = cup[i + 1];
    for (int64_t r = lo; r < hi; ++r) last[r] = len[i] - (hi - r);  // the new tokens end the context
    for (int64_t r = lo; r < hi; r += TILE) items.push_back({i, r, std::min<int64_t>(TILE, hi - r)});
  }
  return run_items(q, k_cache, v_cache, block_tables, scale, items, last);
}

}  // namespace elastic_decode
