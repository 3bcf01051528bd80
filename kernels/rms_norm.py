"""rms_norm: RMSNorm of each row, optionally fused with the residual add before it.

In a decoder layer the residual add and the next RMSNorm read and write the same hidden row
back to back; one kernel reads x and the residual once, writes the new residual and the normed
row (vLLM's fused_add_rms_norm, here out of place). Rounding follows HF's LlamaRMSNorm so the
result equals the unfused torch ops: the add is rounded to the model dtype, the statistics are
fp32, the normed row is rounded to the model dtype before the weight multiplies it.

Layout: x, residual [num_rows, hidden] (last dim contiguous, any row stride); weight [hidden].
One program per row; a row is one tile (hidden <= 16384).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .device_guard import on_tensor_device

MAX_HIDDEN = 16384  # one tile per row: fits the registers of one program


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden] (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden] contiguous: the normed rows
    residual_out_ptr,  # [num_rows, hidden] contiguous: x + residual (HAS_RESIDUAL)
    x_stride,
    residual_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # hidden rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(residual_out_ptr.dtype.element_ty)  # the model-dtype add of the unfused graph
        tl.store(residual_out_ptr + row * hidden + cols, h, mask=mask)
        x = h.to(tl.float32)
    # Correctly rounded sqrt and divisions (Triton's defaults are approximate on GPUs), products not
    # contracted into FMAs (the launch turns fusion off): on hardware too, the reference's roundings
    # but for the order of the sum.
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=0), hidden.to(tl.float32)) + eps))
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def rms_norm(
    x: torch.Tensor,  # [num_rows, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_rows, hidden]: added to x first
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * norm(x), or (weight * norm(x + residual), x + residual) with a residual."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [rows, hidden] and weight [hidden], got {tuple(x.shape)}, {tuple(weight.shape)}")
    num_rows, hidden = x.shape
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden {hidden} > {MAX_HIDDEN}: one row must fit one tile")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype} vs {tuple(x.shape)} {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    out = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    residual_out = None
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        residual_out = torch.empty_like(out)
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out,
            residual_out if residual_out is not None else out,
            x_stride=x.stride(0), residual_stride=residual.stride(0) if residual is not None else 0,
            hidden=hidden, eps=eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            enable_fp_fusion=False,
        )
    return out if residual is None else (out, residual_out)
