"""Model code: Llama-family decoders running on the paged KV cache."""
from .batch import AttentionBatch, KernelOps
from .llama import LlamaForCausalLM, ModelSpec, rope_inv_freq

__all__ = ["AttentionBatch", "KernelOps", "LlamaForCausalLM", "ModelSpec", "rope_inv_freq"]
