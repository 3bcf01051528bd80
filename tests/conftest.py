"""Shared fixtures: the embedded model's checkpoint and tiny random HF checkpoints.

The tiny models are built with transformers (`save_pretrained` into a temp dir) and reuse
the embedded model's tokenizer, so text prompts and chat templates work on them.
"""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it is chosen when a kernel
# is decorated, so this must happen before anything imports elastic_decode.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from elastic_decode.models.loader import resolve_checkpoint  # noqa: E402


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language (inspect.getmembers over its modules, about
    2 ms) on every call of a nested @triton.jit function, though the launch has patched the same
    modules already and restores them when it ends; the sampler's kernels make dozens of such
    calls per row. Skip a nested re-patch of modules this launch has patched (a test-speed fix:
    what runs is unchanged)."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    state = {"launches": 0, "patched": set()}

    class _Nothing:
        def restore(self) -> None:
            pass

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if state["launches"] and langs <= state["patched"]:
            return _Nothing()
        scope = patch(fn)
        if state["launches"]:
            state["patched"] |= langs
        return scope

    def counted_launch(self, *args, **kwargs):
        outer = state["patched"]
        state["launches"] += 1
        state["patched"] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launches"] -= 1
            state["patched"] = outer

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = counted_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_path():
    return resolve_checkpoint(None)


def _tiny_config(kind: str, vocab: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # Larger than the usual 0.02 so the random model's logits are peaked enough that
        # greedy decoding is not decided by float rounding.
        initializer_range=0.2,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, head_dim=16)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False, head_dim=32)
    raise ValueError(kind)


def make_tiny_checkpoint(kind: str, folder, tokenizer_path, seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"llama": path, "qwen2": path, "qwen3": path} of tiny random checkpoints.

    Their tokenizer is the embedded model's, or the one in ELASTIC_DECODE_TEST_TOKENIZER (a
    folder of tokenizer files: the GPU machine cannot hold the embedded model, see
    benchmarks/gpu_session.sh)."""
    tokenizer = os.environ.get("ELASTIC_DECODE_TEST_TOKENIZER") or resolve_checkpoint(None)
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_checkpoint(k, root / k, tokenizer) for k in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


# -- a module's server: its own `served` fixture yields (url, loop, ...); these read it ------------------


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def loop(served):
    return served[1]


@pytest.fixture(scope="module")
def ref(tiny_llama):
    """The engine a server's answers are compared with (the server tests' settings)."""
    from engines import tiny_llm

    return tiny_llm(tiny_llama)
