"""Engine construction settings."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ElasticDecodeError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Kernel implementations (worker/backend.py): Triton on CUDA, the C++ CPU kernels, or the torch reference.
BACKENDS = ("auto", "triton", "cpu", "reference")
# Weight-only quantization (opt-in): "int4", the decoder layers' GEMMs on 4-bit weights and the LM head's on
# 8-bit ones, in groups of 32 (kernels/cpu.py, csrc/cpu_quant.cpp); CPU backend only.
QUANTIZATIONS = ("int4",)
# How a thinking budget is enforced: "in-kernel" (the sampler forces the marker on the device,
# this engine's point) or "two-call" (the reference recipe: think, append the marker, prefill
# again, solve), kept to measure against.
BUDGET_MODES = ("in-kernel", "two-call")


@dataclass(frozen=True)
class EngineConfig:
    # Checkpoint directory, .gguf file, or None for the embedded SmolLM2-135M-Instruct.
    model: str | None = None
    # Weight and KV dtype. "auto": on CPU bfloat16 where the CPU computes it natively (AVX512-BF16 or
    # AMX), else float32; on CUDA the checkpoint's 16-bit dtype (else bfloat16). "float32" is the
    # setting of exact parity with HF. Sampling, logprobs and budgets are fp32 arithmetic in any dtype.
    dtype: str = "auto"
    # Weight-only quantization: None, or "int4": the decoder layers' GEMM weights in 4 bits and the LM
    # head's in 8, groups of 32 with float32 scales (GGUF's Q4_1 and Q8_0 layouts: a Q4_1 GGUF such as
    # the embedded model keeps its own weights), activations float32. CPU backend only; faster decode at
    # small batches, slower at batch 16 and in prefill (benchmarks/RESULTS.md).
    quantization: str | None = None
    # "cpu", "cuda", "cuda:1"...; None picks CUDA when available.
    device: str | None = None
    # Kernel implementation: "auto" | "triton" | "cpu" | "reference" (env ELASTIC_DECODE_BACKEND).
    backend: str | None = None
    # Tokens per KV-cache block.
    block_size: int = 16
    # Longest prompt + completion; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Sequences decoded together at most.
    max_num_seqs: int = 256
    # Prompt tokens prefilled in one step at most (a longer single prompt still runs alone).
    max_num_batched_tokens: int = 8192
    # KV-cache size in blocks; None sizes it from kv_cache_memory_gb.
    num_kv_blocks: int | None = None
    # KV-cache size in GiB; None = 1 GiB on CPU, 90% of the free GPU memory on CUDA.
    kv_cache_memory_gb: float | None = None
    # Seeds the request seeds of requests that give none, for reproducible runs.
    seed: int | None = None
    # Decode steps run back to back on the device between two host syncs (multi-step
    # scheduling). Outputs are the same for any value; larger values save host round trips,
    # but finished sequences leave and new ones join only between chunks.
    num_scheduler_steps: int = 1
    # Replay each decode step from a CUDA graph captured per batch-size bucket (CUDA only).
    # Saves the host's kernel launches; costs the captures at start-up and GPU memory for the
    # graphs' pool. None (default): on where they can run (CUDA, the Triton kernels, one rank)
    # unless enforce_eager; a capture that fails at start-up leaves the engine eager, with a
    # warning. True: required (an error where they cannot run).
    cuda_graphs: bool | None = None
    # Never capture CUDA graphs (vLLM's name for the switch): decode step by step, eagerly.
    enforce_eager: bool = False
    # Ranks the model is split over (Megatron-style tensor parallelism, distributed/): the LLM
    # starts tensor_parallel_size - 1 worker processes, one per extra GPU (or CPU process).
    tensor_parallel_size: int = 1
    # Seconds a collective may wait on a worker before the engine gives up with an error.
    tensor_parallel_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ElasticDecodeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_scheduler_steps",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ElasticDecodeError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ElasticDecodeError(f"{name} must be a positive integer or None, got {value!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ElasticDecodeError(f"cuda_graphs must be True, False or None (auto), got {self.cuda_graphs!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ElasticDecodeError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        if self.cuda_graphs and self.enforce_eager:
            raise ElasticDecodeError("cuda_graphs=True and enforce_eager=True contradict each other")
        if not self.tensor_parallel_timeout_s > 0:
            raise ElasticDecodeError(f"tensor_parallel_timeout_s must be > 0, got {self.tensor_parallel_timeout_s!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ElasticDecodeError(f"backend must be one of {', '.join(BACKENDS)} or None, got {self.backend!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ElasticDecodeError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                                     f"got {self.quantization!r}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ElasticDecodeError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
