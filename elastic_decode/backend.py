"""Choose the kernel implementation: Triton on CUDA tensors, the torch reference on CPU.

`ELASTIC_DECODE_BACKEND=triton|reference` (or LLM(backend=...)) forces one. The Triton kernels
run on CPU tensors only under TRITON_INTERPRET=1, which the tests use.
"""
from __future__ import annotations

import os

import torch

from elastic_decode import kernels
from elastic_decode.kernels import reference

from .errors import ElasticDecodeError
from .models.batch import KernelOps

BACKENDS = ("auto", "triton", "reference")


def _ops_from(name: str, namespace) -> KernelOps:
    """KernelOps from a module that defines every op of the contract under its own name."""
    return KernelOps(
        name=name,
        rope_write_kv=namespace.rope_write_kv,
        paged_decode_attention=namespace.paged_decode_attention,
        paged_prefill_attention=namespace.paged_prefill_attention,
        sample_with_budget=namespace.sample_with_budget,
        rms_norm=namespace.rms_norm,
        silu_mul=namespace.silu_mul,
    )


def reference_ops() -> KernelOps:
    return _ops_from("reference", reference)


def triton_ops() -> KernelOps | None:
    """The Triton launchers, or None where triton is not installed."""
    return _ops_from("triton", kernels) if kernels.HAVE_TRITON else None


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
