"""Llama-family decoder on the paged KV cache: Llama, Qwen2 (qkv bias), Qwen3 (q/k norm).

Module and parameter names follow HF transformers exactly, so a HF state dict (a checkpoint,
or a trainer's live model) loads by name with no mapping. Attention goes through the kernel
contracts (rope_write_kv, paged_prefill_attention, paged_decode_attention) passed in as `ops`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import Group, Shard, vocab_parallel_embedding
from ..errors import ModelLoadError
from .batch import AttentionBatch, KernelOps

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# HF projections that live packed in one of this model's (a packed-modules mapping, as nano-vllm and
# vLLM keep): HF module -> (packed module, its section). Checkpoints and load_weights use HF names.
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the engine needs, read from a HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool  # Qwen2 always, Llama when attention_bias
    o_bias: bool  # Llama attention_bias also biases o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool
    max_position_embeddings: int

    @staticmethod
    def from_hf_config(config) -> "ModelSpec":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ModelLoadError("sliding-window attention is not supported")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return ModelSpec(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_q_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral") and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling from the checkpoint's rope settings.

    The default rope is computed here; scaled variants (linear, llama3, yarn, longrope) reuse
    transformers' own initialisers so they match the checkpoint's semantics exactly.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ModelLoadError("dynamic NTK rope scaling is not supported (it depends on the sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_positions: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 [max_positions, head_dim] for every position, as HF computes them
    (rotate-half layout, the rope type's attention scaling applied)."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq.to(device)[None, :]  # [max_positions, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
    return emb.cos() * scaling, emb.sin() * scaling


class RMSNorm(nn.Module):
    """The weight and eps of an RMSNorm; the norm itself runs in the ops (ops.rms_norm for the layer
    norms, ops.rope_write_kv for Qwen3's q/k head norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps


def _row_parallel(linear: nn.Linear, x: torch.Tensor, tp: Group | None, ops: KernelOps) -> torch.Tensor:
    """A row-parallel linear (Megatron): each rank's partial product, summed over ranks, then the bias."""
    if tp is None:
        return ops.linear(x, linear.weight, linear.bias)
    y = tp.all_reduce(ops.linear(x, linear.weight))
    return y if linear.bias is None else y + linear.bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, shard: Shard | None = None, tp: Group | None = None):
        super().__init__()
        self.spec, self.tp = spec, tp
        d = spec.head_dim
        hq, hkv = (shard.q_heads, shard.kv_heads) if shard else (spec.num_q_heads, spec.num_kv_heads)
        self.num_q_heads, self.num_kv_heads = hq, hkv  # this rank's
        # q, k and v in one GEMM: HF's q_proj / k_proj / v_proj rows packed at load (PACKED below).
        self.sections = (hq * d, hkv * d, hkv * d)
        self.qkv_proj = nn.Linear(spec.hidden_size, sum(self.sections), bias=spec.qkv_bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # int64 [num_tokens]
        rope: tuple[torch.Tensor, torch.Tensor],  # fp32 (cos, sin) tables [max_positions, head_dim]
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's (k_cache, v_cache)
        batch: AttentionBatch,
        ops: KernelOps,
    ) -> torch.Tensor:
        n, d = x.shape[0], self.spec.head_dim
        q, k, v = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias).split(self.sections, dim=-1)  # views of [num_tokens, q + 2 kv columns]
        q = q.view(n, self.num_q_heads, d)  # [num_tokens, num_q_heads, head_dim] (this rank's)
        k = k.view(n, self.num_kv_heads, d)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(n, self.num_kv_heads, d)
        k_cache, v_cache = kv
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.spec.qk_norm else ()
        # (Qwen3's q/k head norms,) RoPE on q and k, and k, v into the cache: one kernel
        q = ops.rope_write_kv(q, k, v, positions, *rope, k_cache, v_cache, batch.slot_mapping, *norms)
        if batch.is_prefill:
            o = ops.paged_prefill_attention(
                q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q, batch.context_lens, self.scale,
                max_new_tokens=batch.max_new_tokens,
            )
        else:
            o = ops.paged_decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, self.scale)
        return _row_parallel(self.o_proj, o.reshape(n, -1), self.tp, ops)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, shard: Shard | None = None, tp: Group | None = None):
        super().__init__()
        self.tp = tp
        width = shard.intermediate if shard else spec.intermediate_size
        # gate and up in one GEMM: HF's gate_proj / up_proj rows packed at load (PACKED below).
        self.sections = (width, width)
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * width, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(width, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        gate, up = ops.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias).split(self.sections, dim=-1)  # column views: silu_mul takes row strides
        return _row_parallel(self.down_proj, ops.silu_mul(gate, up), self.tp, ops)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, shard: Shard | None = None, tp: Group | None = None):
        super().__init__()
        self.self_attn = Attention(spec, shard, tp)
        self.mlp = MLP(spec, shard, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, residual, positions, rope, kv, batch, ops):
        """x: the previous layer's MLP output (the embeddings, with residual None, for layer 0).

        Returns (this layer's MLP output, the residual stream before it): each residual add is
        fused into the RMSNorm that follows it, as in vLLM."""
        norm_in, norm_post = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            h, residual = ops.rms_norm(x, norm_in.weight, norm_in.eps), x
        else:
            h, residual = ops.rms_norm(x, norm_in.weight, norm_in.eps, residual)
        h = self.self_attn(h, positions, rope, kv, batch, ops)
        h, residual = ops.rms_norm(h, norm_post.weight, norm_post.eps, residual)
        return self.mlp(h, ops), residual


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, shard: Shard | None = None, tp: Group | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(shard.vocab if shard else spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, shard, tp) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole decoder; `forward` returns hidden states, `compute_logits` the chosen rows.

    With `tp` (distributed.Group), this rank's shard of it (distributed/shard.py): parameter names stay HF's,
    shapes are the local slices, and `load_weights` takes full HF tensors and keeps its slice."""

    def __init__(self, spec: ModelSpec, tp: Group | None = None):
        super().__init__()
        self.spec, self.tp = spec, tp
        self.shard = Shard.of(spec, tp.rank, tp.size) if tp is not None else None
        self.model = Backbone(spec, self.shard, tp)
        if not spec.tie_word_embeddings:
            vocab = self.shard.vocab if self.shard else spec.vocab_size
            self.lm_head = nn.Linear(spec.hidden_size, vocab, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def kv_heads(self) -> int:
        """The kv heads this model (this rank's shard) holds: what its KV cache stores."""
        return self.shard.kv_heads if self.shard else self.spec.num_kv_heads

    def set_rope(self, inv_freq: torch.Tensor, scaling: float, max_positions: int) -> None:
        self.rope_cos, self.rope_sin = rope_tables(inv_freq, scaling, max_positions,
                                                   self.model.embed_tokens.weight.device)

    @torch.no_grad()
    def load_weights(self, named_tensors, all_or_nothing: bool = False, local: bool = False) -> int:
        """Copy HF-named tensors into the parameters in place; returns how many were copied.

        Unknown names and wrong shapes raise ModelLoadError; a tied lm_head.weight and rotary
        buffers of old checkpoints are skipped. all_or_nothing (weight updates from a trainer or a
        user): every name, shape and value is checked first (non-finite values refused) and
        nothing changes unless all pass; without it tensors stream in one at a time (checkpoint
        loading, where a failure fails the whole engine anyway). A tensor-parallel shard takes full
        HF tensors and keeps its slice, or (`local`) tensors that are its slices already.
        """
        if all_or_nothing:
            pairs = self.check_weights(named_tensors)
        else:
            params = dict(self.named_parameters())
            pairs = ((name, tensor, self._target(name, tensor, params, local)) for name, tensor in named_tensors)
        count = 0
        for name, tensor, target in pairs:
            if target is not None:
                target.copy_(self.shard.take(name, tensor) if self.shard and not local else tensor)
                count += 1
        return count

    def check_weights(self, named_tensors) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, full tensor, parameter) of every weight to load, after checking every name, shape, dtype
        and value; tied and rotary names left out. Values are checked in the dtype they are copied into: a
        float64 1e300 is finite, and inf once in bf16 (float8, which has no isfinite, is checked that way
        too). Tensors that are not floating point (ints, bools, complex) are refused: no weight is one."""
        params = dict(self.named_parameters())
        pairs = [(name, tensor, self._target(name, tensor, params)) for name, tensor in named_tensors]
        pairs = [(name, tensor, target) for name, tensor, target in pairs if target is not None]
        if pairs:
            finite = torch.stack([_all_finite(t.detach().to(device=target.device, dtype=target.dtype))
                                  for _, t, target in pairs])  # one sync; one converted tensor alive at a time
            if not bool(finite.all()):
                bad = [name for (name, _, _), ok in zip(pairs, finite.tolist()) if not ok]
                raise ModelLoadError(f"weight {bad[0]!r} has non-finite values (NaN or inf) in the model's "
                                     f"{str(pairs[0][2].dtype).removeprefix('torch.')}"
                                     + (f", and {len(bad) - 1} more" if len(bad) > 1 else "") + "; nothing was loaded")
        return pairs

    def hf_shape(self, name: str, params: dict[str, torch.Tensor] | None = None) -> tuple[int, ...] | None:
        """The shape of the full HF tensor `name` this model loads; None for names a checkpoint may hold
        that are not loaded (a tied lm_head, old rotary buffers). Unknown names raise ModelLoadError."""
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.spec.tie_word_embeddings):
            return None
        target = self.hf_parameter(name, params)
        if target is None:
            raise ModelLoadError(f"unexpected weight {name!r} for a {self.spec.model_type} model")
        shape = tuple(target.shape)
        return self.shard.full_shape(name, shape) if self.shard else shape

    def _target(self, name: str, tensor, params: dict[str, torch.Tensor], local: bool = False) -> torch.Tensor | None:
        """The parameter `name` loads into (None: skipped), after checking the tensor's type, dtype and shape."""
        if self.hf_shape(name, params) is None:
            return None
        target = self.hf_parameter(name, params)
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"weight {name!r} must be a tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ModelLoadError(f"weight {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; weights "
                                 "must be floating point; nothing was loaded")
        expected = self.hf_shape(name, params) if self.shard and not local else tuple(target.shape)
        if expected != tuple(tensor.shape):
            raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        return target

    def hf_parameter(self, name: str, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The parameter (or the rows of a packed one) that holds the HF weight `name`; `params` is
        `dict(self.named_parameters())` when the caller looks up many names."""
        params = dict(self.named_parameters()) if params is None else params
        if name in params:
            return params[name]
        prefix, module, kind = (name.rsplit(".", 2) + ["", ""])[:3]
        if module not in PACKED:
            return None
        packed, index = PACKED[module]
        param = params.get(f"{prefix}.{packed}.{kind}")
        if param is None:
            return None
        sections = self.get_submodule(prefix).sections
        start = sum(sections[:index])
        return param[start : start + sections[index]]  # a view: copying into it fills the packed rows

    def hf_named_parameters(self):
        """(HF name, parameter or packed rows) of every weight, as a checkpoint names them."""
        unpacked = {packed: [m for m, (p, _) in PACKED.items() if p == packed] for packed, _ in PACKED.values()}
        params = dict(self.named_parameters())
        for name, param in params.items():
            prefix, module, kind = (name.rsplit(".", 2) + ["", ""])[:3]
            if module in unpacked:
                for hf_module in unpacked[module]:
                    hf_name = f"{prefix}.{hf_module}.{kind}"
                    yield hf_name, self.hf_parameter(hf_name, params)
            else:
                yield name, param

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        batch: AttentionBatch,
        ops: KernelOps,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        if self.tp is None:
            x = self.model.embed_tokens(input_ids)  # [num_tokens, hidden]
        else:
            x = vocab_parallel_embedding(input_ids, self.model.embed_tokens.weight, self.shard, self.tp)
        rope = (self.rope_cos, self.rope_sin)
        residual = None
        fused = None if ops.decode_layers is None else ops.decode_layers(self, x, positions, rope, kv_caches, batch)
        if fused is not None:  # every layer in one call (the same ops, the same numbers)
            x, residual = fused
        else:
            for layer, kv in zip(self.model.layers, kv_caches):
                x, residual = layer(x, residual, positions, rope, kv, batch, ops)
        norm = self.model.norm
        if residual is None:  # no layers
            return ops.rms_norm(x, norm.weight, norm.eps)
        return ops.rms_norm(x, norm.weight, norm.eps, residual)[0]

    def _logits_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def linear_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The weights the forward gives to ops.linear, and to ops.logits_linear (for ops.prepare_linear)."""
        weights = [m.weight for layer in self.model.layers
                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        return weights, [self._logits_weight()]

    def compute_logits(self, hidden: torch.Tensor, ops: KernelOps) -> torch.Tensor:  # [rows, vocab]
        weight, linear = self._logits_weight(), ops.logits_linear or ops.linear
        if self.tp is None:
            return linear(hidden, weight)
        logits = self.tp.all_gather_last(linear(hidden, weight))  # [rows, padded vocab]
        return logits if logits.shape[1] == self.spec.vocab_size else logits[:, : self.spec.vocab_size].contiguous()


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: no NaN or inf in `t`. Its min and max, one pass with no tensor of t's size (isfinite().all()
    writes one: 20x slower on a CPU, most of a trainer's weight sync); NaN propagates into both."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)

