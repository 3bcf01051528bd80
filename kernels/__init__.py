"""Kernel ops of elastic_decode (installed as `elastic_decode.kernels`).

`elastic_decode.kernels.<op>` is the Triton launcher of each op (one file per op);
`reference` holds the pure-torch reference of every op with the same signature. This package
imports nothing from the engine; choosing between the two is the engine's job. Where Triton
is not installed, only the references are here.
"""
from . import reference
from .budget_state import (
    DONE,
    FINISH_LENGTH,
    FINISH_NONE,
    FINISH_NONFINITE,
    FINISH_STOP,
    FORCING,
    MARKER_PAD,
    MAX_MARKER_TOKENS,
    NO_LIMIT,
    PAD_TOKEN,
    RECENT_PAD,
    SOLVING,
    STOP_PAD,
    THINKING,
    CONF_K,
    BudgetState,
    SamplerParams,
    sampling_batch,
)

try:
    from .paged_decode_attention import paged_decode_attention
    from .paged_prefill_attention import paged_prefill_attention
    from .rms_norm import rms_norm
    from .sample_with_budget import sample_with_budget
    from .rope_write_kv import rope_write_kv
    from .silu_mul import silu_mul

    HAVE_TRITON = True
except ImportError:  # no triton on this platform: the engine uses the references
    HAVE_TRITON = False

__all__ = [
    "reference",
    "HAVE_TRITON",
    "BudgetState",
    "SamplerParams",
    "sampling_batch",
    "THINKING",
    "FORCING",
    "SOLVING",
    "DONE",
    "FINISH_NONE",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "FINISH_NONFINITE",
    "NO_LIMIT",
    "CONF_K",
    "MAX_MARKER_TOKENS",
    "PAD_TOKEN",
    "MARKER_PAD",
    "RECENT_PAD",
    "STOP_PAD",
]
