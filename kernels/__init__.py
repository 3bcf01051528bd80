"""Kernel ops of elastic_decode (installed as `elastic_decode.kernels`).

`reference` holds the pure-torch reference of every op; the Triton launchers with the same
signatures live one per file beside it. This package imports nothing from the engine.
"""
from . import reference
from .budget_state import (
    DONE,
    FINISH_LENGTH,
    FINISH_NONE,
    FINISH_STOP,
    FORCING,
    NO_LIMIT,
    PAD_TOKEN,
    SOLVING,
    THINKING,
    BudgetState,
    SamplerParams,
)

__all__ = [
    "reference",
    "BudgetState",
    "SamplerParams",
    "THINKING",
    "FORCING",
    "SOLVING",
    "DONE",
    "FINISH_NONE",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "NO_LIMIT",
    "PAD_TOKEN",
]
