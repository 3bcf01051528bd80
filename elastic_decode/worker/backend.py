"""Choose the kernel implementation: Triton on CUDA tensors, the C++ CPU kernels on CPU tensors.

"cpu" is the torch reference with its decode attention, RMSNorm and RoPE + cache write replaced by the C++
ops of csrc/, its GEMMs run on oneDNN-packed weights (packed at load) and its sampler without sorts
(kernels/cpu.py);
"reference" is the torch reference alone, the oracle of every test. `ELASTIC_DECODE_BACKEND=
triton|cpu|reference` (or LLM(backend=...)) forces one. The Triton kernels run on CPU tensors only
under TRITON_INTERPRET=1, which the tests use.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from elastic_decode import kernels
from elastic_decode.kernels import cpu, reference
from elastic_decode.kernels.paged_checks import MIN_HEAD_DIM

from ..config import BACKENDS, QUANTIZATIONS
from ..errors import ElasticDecodeError
from ..models import KernelOps, ModelSpec


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


def cpu_ops() -> KernelOps | None:
    """The reference with the C++ paged decode attention, RMSNorm and RoPE + cache write, the packed-weight
    GEMMs and the sort-free sampler (the reference's tokens), or None where the extension lacks them.
    The C++ prefill attention is not selected: `make microbench` measures it 2-3x slower than the
    reference's batched GEMMs on a 256-token prompt (its per-key softmax is scalar), so the reference
    keeps prefill."""
    if not cpu.HAVE_CPU_KERNELS:
        return None
    return dataclasses.replace(reference_ops(), name="cpu", paged_decode_attention=cpu.paged_decode_attention,
                               linear=cpu.linear, prepare_linear=cpu.prepare_linear, rms_norm=cpu.rms_norm,
                               rope_write_kv=cpu.rope_write_kv, sample_with_budget=cpu.sample_with_budget)


def triton_ops() -> KernelOps | None:
    """The Triton launchers, or None where triton is not installed."""
    return _ops_from("triton", kernels) if kernels.HAVE_TRITON else None


def select_ops(device: torch.device, backend: str | None = None, quantization: str | None = None) -> KernelOps:
    ops = _select(device, backend)
    if quantization is None:
        return ops
    if quantization not in QUANTIZATIONS:
        raise ElasticDecodeError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                                 f"got {quantization!r}")
    if ops.name != "cpu" or not cpu.HAVE_QUANTIZED_LINEAR:
        raise ElasticDecodeError(f"quantization={quantization!r} runs on the cpu backend (CPU tensors, the C++ "
                                 f"kernels); this engine has the {ops.name} backend on {device.type}")
    return dataclasses.replace(ops, linear=cpu.int4_linear, logits_linear=cpu.int8_linear,
                               prepare_linear=cpu.prepare_int4_linear,
                               decode_layers=cpu.int4_decode_layers if cpu.HAVE_INT4_DECODER else None)


def _select(device: torch.device, backend: str | None) -> KernelOps:
    choice = backend or os.environ.get("ELASTIC_DECODE_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ElasticDecodeError(f"backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "reference":
        return reference_ops()
    if choice == "auto":
        # Triton on CUDA tensors when its launchers import, the C++ kernels on CPU; else the reference.
        ops = triton_ops() if device.type == "cuda" else cpu_ops() if device.type == "cpu" else None
        return ops or reference_ops()
    if choice == "cpu":
        if device.type != "cpu":
            raise ElasticDecodeError(f"the cpu backend runs on CPU tensors; this engine runs on {device}")
        ops = cpu_ops()
        if ops is None:
            raise ElasticDecodeError("the cpu backend needs the C++ extension elastic_decode._C with its kernels "
                                     "(rebuild it: make setup)")
        return ops
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ElasticDecodeError("the triton backend on CPU needs TRITON_INTERPRET=1 (tests only)")
    ops = triton_ops()
    if ops is None:
        raise ElasticDecodeError("the triton backend needs the triton package, which is not installed")
    return ops


def check_kernel_shapes(spec: ModelSpec, backend: str) -> None:
    """Refuse, at start-up and in one line, a model the chosen kernels cannot run (instead of a ValueError
    from the first launch)."""
    d = spec.head_dim
    if backend == "triton" and (d & (d - 1) or d < MIN_HEAD_DIM):
        raise ElasticDecodeError(f"the Triton attention kernels need a head_dim that is a power of two and at least "
                                 f"{MIN_HEAD_DIM} (tl.dot's smallest K on NVIDIA GPUs); this model's is {d}: use "
                                 "backend='reference'")
