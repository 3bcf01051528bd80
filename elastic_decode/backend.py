"""Choose the kernel implementation: Triton on CUDA tensors, the torch reference on CPU.

`ELASTIC_DECODE_BACKEND=triton|reference` (or LLM(backend=...)) forces one. The Triton kernels
run on CPU tensors only under TRITON_INTERPRET=1, which the tests use.
"""
from __future__ import annotations

import os

import torch

from elastic_decode.kernels import reference

from .errors import ElasticDecodeError
from .models.batch import KernelOps

BACKENDS = ("auto", "triton", "reference")


def reference_ops() -> KernelOps:
    return KernelOps(
        name="reference",
        write_kv=reference.write_kv,
        paged_decode_attention=reference.paged_decode_attention,
        paged_prefill_attention=reference.paged_prefill_attention,
        sample_with_budget=reference.sample_with_budget,
    )


def triton_ops() -> KernelOps | None:
    """The Triton launchers, or None where triton is not installed."""
    from elastic_decode import kernels

    if not kernels.HAVE_TRITON:
        return None
    return KernelOps(
        name="triton",
        write_kv=kernels.write_kv,
        paged_decode_attention=kernels.paged_decode_attention,
        paged_prefill_attention=kernels.paged_prefill_attention,
        sample_with_budget=kernels.sample_with_budget,
    )


def select_ops(device: torch.device, backend: str | None = None) -> KernelOps:
    choice = backend or os.environ.get("ELASTIC_DECODE_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ElasticDecodeError(f"backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "reference":
        return reference_ops()
    if choice == "auto":
        # Triton on CUDA tensors when its launchers import; the reference everywhere else.
        ops = triton_ops() if device.type == "cuda" else None
        return ops or reference_ops()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ElasticDecodeError("the triton backend on CPU needs TRITON_INTERPRET=1 (tests only)")
    ops = triton_ops()
    if ops is None:
        raise ElasticDecodeError("the triton backend needs the triton package, which is not installed")
    return ops
