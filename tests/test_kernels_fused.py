"""The fused small ops (RMSNorm with the residual add, SiLU-mul) against the torch reference, for every
provider of each contract: the Triton kernels (in Triton's interpreter on CPU, fp32 / fp16; with a GPU,
bf16 too) and, for RMSNorm, the C++ CPU op (fp32 / bf16 / fp16).

Fresh random inputs per case, odd and model widths (SmolLM2's 576, the reference 1536,
Qwen2-1.5B's intermediate 8960), one row and ragged row counts, strided row views.
"""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference
from elastic_decode.kernels.rms_norm import rms_norm
from elastic_decode.kernels.silu_mul import silu_mul
from test_kernels_attention import PROVIDERS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# One rounding step of the dtype: the kernels differ from torch only in fp32 reduction order
# and 1/sqrt vs rsqrt, which can flip the last bit of a rounded output.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
# The C++ ops keep the reference's roundings in its order but for the sum of squares: fp32 agrees to an ulp
# or two, and a bf16/fp16 element now and then rounds the other way (one unit; nearly all are equal).
CPU_TOL = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}


def fused_close(provider: str, got, expected, dtype) -> None:
    atol, rtol = (CPU_TOL if provider == "cpu" else TOL)[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    if provider == "cpu" and dtype != torch.float32:
        assert (got != expected).float().mean() < 0.01


def rows_view(rows: int, width: int, dtype, scale: float = 1.0) -> torch.Tensor:
    """[rows, width] with a row stride larger than width (a column slice of a wider tensor)."""
    wide = torch.randn(rows, width + 24, device=DEVICE) * scale
    return wide.to(dtype)[:, 5 : 5 + width]


@pytest.mark.parametrize("provider, dtype", PROVIDERS)
@pytest.mark.parametrize("rows, hidden", [(1, 576), (16, 576), (7, 1536), (33, 100), (37, 80), (4, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(provider, dtype, rows, hidden, with_residual):
    torch.manual_seed(rows * hidden)
    x = rows_view(rows, hidden, dtype, scale=3.0)
    weight = (torch.randn(hidden, device=DEVICE) * 0.5 + 1).to(dtype)
    residual = rows_view(rows, hidden, dtype, scale=10.0) if with_residual else None
    got = (cpu.rms_norm if provider == "cpu" else rms_norm)(x, weight, 1e-6, residual)
    expected = reference.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)  # the add rounds exactly like torch
        got, expected = got[0], expected[0]
    assert got.dtype == dtype and got.shape == (rows, hidden)
    fused_close(provider, got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 1536), (5, 8960), (17, 1000), (3, 7)])
def test_silu_mul_matches_the_reference(dtype, rows, width):
    torch.manual_seed(rows + width)
    gate, up = rows_view(rows, width, dtype, scale=4.0), rows_view(rows, width, dtype, scale=2.0)
    got = silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == (rows, width)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, reference.silu_mul(gate, up), atol=atol, rtol=rtol)


def test_bad_shapes_are_rejected():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, torch.zeros(2, 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="gate and up"):
        silu_mul(x, torch.zeros(2, 9, device=DEVICE))
