"""silu_mul: silu(gate) * up, the SwiGLU of the MLP, in one pass.

Unfused, torch writes silu(gate) and reads it back for the product: one extra round trip of
the [num_rows, intermediate] activation (the MLP's widest). Rounding follows torch in the model
dtype: silu is computed in fp32 as x / (1 + exp(-x)) and rounded, then the product is rounded.
(Liger-Kernel's swiglu fuses the same pair.)

Layout: gate, up [num_rows, intermediate] (last dim contiguous, any row stride).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .device_guard import on_tensor_device

BLOCK = 1024  # elements of a row per program


@triton.jit
def _silu_mul_kernel(
    gate_ptr,  # [num_rows, width]
    up_ptr,  # [num_rows, width]
    out_ptr,  # [num_rows, width] contiguous
    gate_stride,
    up_stride,
    width,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < width
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def silu_mul(
    gate: torch.Tensor,  # [num_rows, width]
    up: torch.Tensor,  # [num_rows, width]
) -> torch.Tensor:
    if gate.dim() != 2 or up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"gate and up must be equal [rows, width] tensors, got {tuple(gate.shape)}, {tuple(up.shape)}")
    gate = gate if gate.stride(1) == 1 else gate.contiguous()
    up = up if up.stride(1) == 1 else up.contiguous()
    num_rows, width = gate.shape
    out = torch.empty(num_rows, width, dtype=gate.dtype, device=gate.device)
    if num_rows and width:
        _silu_mul_kernel[(num_rows, triton.cdiv(width, BLOCK))](
            gate, up, out, gate_stride=gate.stride(0), up_stride=up.stride(0), width=width, BLOCK=BLOCK,
        )
    return out
