// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) in the form
// Triton's tl.rand uses: counter (offset, 0, 0, 0), key (seed low word, seed high word), ten rounds, the
// first output word folded into [0, 2**31) and scaled by about 2**-31. The torch reference
// (kernels/reference.py: philox_uniform) spends ~200 tensor ops on this per sampler step; here it is a loop.
#include "cpu_philox.h"

#include <cstdint>

namespace elastic_decode {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;

float philox_uniform(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t b = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t a = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t next0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    c0 = next0;
    c2 = next2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = -x - 1;  // -(x + 1) cannot overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace

torch::Tensor philox_uniform_cpu(const torch::Tensor& seed, const torch::Tensor& offset) {
  TORCH_CHECK(seed.device().is_cpu() && offset.device().is_cpu(), "philox_uniform: CPU tensors only");
  TORCH_CHECK(seed.dim() == 1 && offset.dim() == 1 && seed.size(0) == offset.size(0),
              "philox_uniform: seed and offset must be 1-D of one length");
  const auto seeds = seed.to(torch::kLong).contiguous();
  const auto offsets = offset.to(torch::kLong).contiguous();
  auto out = torch::empty({seed.size(0)}, seed.options().dtype(torch::kFloat));
  const int64_t* s = seeds.data_ptr<int64_t>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  float* u = out.data_ptr<float>();
  for (int64_t i = 0; i < seed.size(0); ++i) {
    u[i] = philox_uniform(static_cast<uint64_t>(s[i]), static_cast<uint32_t>(o[i]));
  }
  return out;
}

}  // namespace elastic_decode
