"""elastic_decode: budget-constrained reasoning decoding (Elastic Reasoning) with fused kernels.

    from elastic_decode import LLM, SamplingParams
"""
import torch  # noqa: F401  (the native extension links against libc10: load torch first)

from . import _C  # noqa: F401
from .errors import ElasticDecodeError, InvalidRequestError, ModelLoadError, NonFiniteLogitsError
from .llm import LLM, RolloutBatch
from .outputs import CompletionOutput, GenerationStats, RequestOutput
from .sampling_params import SamplingParams
from .utils.answers import Vote, majority_vote

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "GenerationStats",
    "RolloutBatch",
    "Vote",
    "majority_vote",
    "ElasticDecodeError",
    "InvalidRequestError",
    "ModelLoadError",
    "NonFiniteLogitsError",
]
