// Quantized GEMMs on the CPU (cpu_quant.cpp): 4-bit or 8-bit weights in groups of 32 input columns, GGUF's
// Q4_1 and Q8_0 layouts, never dequantized to memory, times activations quantized per group of 32 to 16-bit
// codes (kernels/cpu.py:quantize_activations is the same rounding in torch).
#pragma once

#include <torch/extension.h>

namespace elastic_decode {

// x float32 [rows, in] (contiguous); codes uint8 [out, in / 2]: per group of 32 columns, 16 bytes, byte j
// holding column j in its low nibble and column j + 16 in its high nibble (Q4_1's order); scale and low
// float32 [out, in / 32]: w = scale * code + low. Returns x @ w.T, float32 [rows, out], computed on x's
// 16-bit codes (the low term on x's float32 group sums). simd false: the
// portable loops even where AVX2 is there (tests).
torch::Tensor q4_linear_cpu(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            const torch::Tensor& low, bool simd = true);

// codes int8 [out, in]; scale float32 [out, in / 32]: w = scale * code (Q8_0). Returns x @ w.T.
torch::Tensor q8_linear_cpu(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            bool simd = true);

}  // namespace elastic_decode
