"""The engine: load a model, accept requests at any time, step until they finish.

request -> scheduler -> model runner -> model (kernels) -> sampler + budget -> outputs.
"""
from __future__ import annotations

import itertools
import logging
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elastic_decode.kernels import FINISH_NONFINITE, FINISH_STOP, MAX_MARKER_TOKENS
from elastic_decode.kernels import cpu as cpu_kernels
from elastic_decode.kernels.paged_checks import MIN_HEAD_DIM

from . import parallel, startup
from .backend import select_ops
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .device_batch import DeviceBatch
from .errors import ElasticDecodeError, InvalidRequestError, NonFiniteLogitsError
from .loader import resolve_checkpoint
from .model_runner import ModelRunner
from .models import LlamaForCausalLM, ModelSpec, rope_inv_freq
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus
from .tokenizer import Tokenizer

log = logging.getLogger("elastic_decode")

_SEED_MASK = (1 << 63) - 1


def _sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request: the request seed itself for sample 0."""
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _SEED_MASK


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)


def _pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ElasticDecodeError(f"unknown device {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a GPU (or a CUDA build of torch)
        if count == 0:
            raise ElasticDecodeError("device 'cuda' requested but no CUDA GPU is available")
        if device.index is not None and device.index >= count:
            raise ElasticDecodeError(f"device {name!r} requested but this machine has {count} CUDA GPU"
                                     f"{'s' if count > 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def _pick_dtype(name: str, device: torch.device, hf_config, quantization: str | None = None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if quantization == "int4":  # its one-call decoder runs in float32 only: bf16 would take the slower per-op path
        return torch.float32
    if device.type == "cpu":  # bf16 where the CPU has the instructions for it, else fp32 (exact and faster there)
        return torch.bfloat16 if cpu_kernels.native_bf16() else torch.float32
    if device.type != "cuda":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def check_kernel_shapes(spec: ModelSpec, backend: str) -> None:
    """Refuse, at start-up and in one line, a model the chosen kernels cannot run (instead of a ValueError
    from the first launch)."""
    d = spec.head_dim
    if backend == "triton" and (d & (d - 1) or d < MIN_HEAD_DIM):
        raise ElasticDecodeError(f"the Triton attention kernels need a head_dim that is a power of two and at least "
                                 f"{MIN_HEAD_DIM} (tl.dot's smallest K on NVIDIA GPUs); this model's is {d}: use "
                                 "backend='reference'")


def wants_cuda_graphs(config: EngineConfig, device_type: str, backend: str) -> bool:
    """Whether the engine captures CUDA graphs: as asked, else (cuda_graphs None) wherever they can run
    (CUDA, the Triton kernels, one rank) unless enforce_eager."""
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    return (not config.enforce_eager and device_type == "cuda" and backend == "triton"
            and config.tensor_parallel_size == 1)


def build_model(path: Path, hf_config, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                max_model_len: int, tp: parallel.Group | None = None) -> LlamaForCausalLM:
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


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's (k_cache, v_cache) of `num_blocks` blocks (this rank's kv heads)."""
    spec, weight = model.spec, model.model.norm.weight
    shape = (num_blocks, block_size, model.kv_heads, spec.head_dim)
    return [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
             torch.zeros(shape, dtype=weight.dtype, device=weight.device)) for _ in range(spec.num_layers)]


class ShardWorker:
    """A tensor-parallel rank other than 0: its shard of the model and KV cache, running what rank 0
    sends (parallel.py)."""

    def __init__(self, spec: parallel.WorkerSpec, group: parallel.Group):
        from transformers import AutoConfig

        self.spec, self.group = spec, group
        path = Path(spec.path)
        hf_config = AutoConfig.from_pretrained(path)
        self.device = torch.device(spec.device)
        self.model = build_model(path, hf_config, ModelSpec.from_hf_config(hf_config), getattr(torch, spec.dtype),
                                 self.device, spec.max_model_len, group)
        command, self.num_blocks = group.recv()  # rank 0 sends the cache size first
        if command != "kv":
            raise RuntimeError(f"tensor-parallel worker: expected the KV cache size, got {command!r}")
        self.runner = ModelRunner(self.model, allocate_kv_caches(self.model, self.num_blocks, spec.block_size),
                                  select_ops(self.device, spec.backend, spec.quantization), spec.block_size)
        self.runner.ops.prepare_linear(*self.model.linear_weights())

    def serve(self) -> None:
        while True:
            command, *args = self.group.recv()
            if command == "step":
                self.runner.execute(args[0])
            elif command == "load":
                params = dict(self.model.named_parameters())
                for name, shape, dtype in args[0]:
                    full = self.group.broadcast(torch.empty(shape, dtype=dtype, device=self.device))
                    with torch.no_grad():
                        self.model.hf_parameter(name, params).copy_(self.model.shard.take(name, full))
                self.runner.ops.prepare_linear(*self.model.linear_weights())
            elif command == "sleep":
                self.runner.kv_caches = []
            elif command == "wake":
                self.runner.kv_caches = allocate_kv_caches(self.model, self.num_blocks, self.spec.block_size)
            elif command == "stop":
                return


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig

        self.config = config
        path = resolve_checkpoint(config.model)
        hf_config = AutoConfig.from_pretrained(path)
        self.spec = ModelSpec.from_hf_config(hf_config)
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device, hf_config, config.quantization)
        self.ops = select_ops(self.device, config.backend, config.quantization)
        check_kernel_shapes(self.spec, self.ops.name)
        self.tokenizer = Tokenizer(path, hf_config)
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)

        parallel.check_sizes(self.spec, config.tensor_parallel_size, self.device)
        self.workers = None
        if config.tensor_parallel_size > 1:
            self._check_parallel_settings()
            self.workers = parallel.Workers(config.tensor_parallel_size, parallel.WorkerSpec(
                path=str(path), dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                backend=config.backend, quantization=config.quantization,
                block_size=config.block_size, max_model_len=self.max_model_len,
                timeout_s=config.tensor_parallel_timeout_s, threads=torch.get_num_threads()), self.device)
            self._finalizer = weakref.finalize(self, self.workers.stop)
        try:
            self.model = build_model(path, hf_config, self.spec, self.dtype, self.device, self.max_model_len,
                                     self.workers.group if self.workers else None)
        except BaseException:
            self.close()
            raise
        self.ops.prepare_linear(*self.model.linear_weights())
        self._params = dict(self.model.named_parameters())  # for name lookups (weights update in place)

        block_size = config.block_size
        graphs = self._graphs()
        probe = self._memory_probe()
        if self.device.type == "cuda" and self.ops.name == "triton":
            startup.compile_kernels(self.spec, block_size, self.dtype, self.device)  # no request pays a compile
        num_blocks = self._num_kv_blocks(block_size, probe, graphs)
        if self.memory_plan is not None and self.memory_plan.graph_bytes is None:
            graphs = None  # the capture failed while measuring it: decode eagerly
        self.num_kv_blocks = num_blocks
        if self.workers is not None:
            self.workers.send(("kv", num_blocks))
        kv_caches = self._allocate_kv_caches(num_blocks)
        self.kv_capacity_tokens = num_blocks * block_size
        if self.kv_capacity_tokens < self.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than the %d-token context window: a prompt and its "
                        "completion are limited to %d tokens (raise kv_cache_memory_gb or num_kv_blocks)",
                        self.kv_capacity_tokens, self.max_model_len, self.kv_capacity_tokens)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=self._prefill_tokens,
            num_steps=config.num_scheduler_steps,
        )
        self.runner = ModelRunner(self.model, kv_caches, self.ops, block_size, graphs, self.workers)
        if graphs is not None and not startup.capture_or_eager(
                lambda: graphs.capture_buckets(kv_caches, self.runner.batch)):
            graphs.release()
            self.runner.graphs = None
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.last_batch: ScheduledBatch | None = None  # what the latest step ran (for metrics)

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return allocate_kv_caches(self.model, num_blocks, self.config.block_size)

    def _check_parallel_settings(self) -> None:
        config = self.config
        if config.cuda_graphs:  # None (auto) turns them off with tensor parallelism
            raise ElasticDecodeError("cuda_graphs with tensor_parallel_size > 1 is not supported yet")
        if self.device.type == "cuda" and config.num_kv_blocks is None and config.kv_cache_memory_gb is None:
            raise ElasticDecodeError("with tensor_parallel_size > 1 on CUDA, give kv_cache_memory_gb (per GPU) or "
                                     "num_kv_blocks: the start-up memory profile runs on one device only")

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done when the engine is garbage-collected)."""
        if getattr(self, "workers", None) is not None:
            self._finalizer.detach()
            self.workers.stop()

    @property
    def sleeping(self) -> bool:
        return not self.runner.kv_caches

    def sleep(self) -> None:
        """Free the KV cache (e.g. while a trainer runs its backward pass); weights stay."""
        if self.has_unfinished():
            raise ElasticDecodeError("cannot sleep with requests in flight")
        self.runner.kv_caches = []
        if self.workers is not None:
            self.workers.send(("sleep",))
        if self.runner.graphs is not None:
            self.runner.graphs.reset()  # the graphs point at the freed cache
        self.block_manager.reset_prefix_cache()  # its cached K/V are gone with the memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allocate the KV cache again after `sleep`."""
        if self.sleeping:
            if self.workers is not None:
                self.workers.send(("wake",))
            self.runner.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)

    # -- start-up -----------------------------------------------------------------------

    @property
    def _prefill_tokens(self) -> int:
        """The scheduler's prefill budget: a prompt as long as the context window still runs alone."""
        return max(self.config.max_num_batched_tokens, self.max_model_len)

    def _graphs(self) -> DecodeGraphs | None:
        self.cuda_graphs = wants_cuda_graphs(self.config, self.device.type, self.ops.name)
        if not self.cuda_graphs:
            return None
        if self.device.type != "cuda":
            raise ElasticDecodeError(f"cuda_graphs needs a CUDA device; this engine runs on {self.device}")
        if self.ops.name != "triton":  # the reference ops read values back to the host mid-step
            raise ElasticDecodeError("cuda_graphs needs the triton backend, not the reference ops")
        return DecodeGraphs(self.model, self.ops, self.config.block_size, self.config.max_num_seqs,
                            max_blocks_per_seq=-(-self.max_model_len // self.config.block_size), device=self.device)

    def _memory_probe(self) -> startup.MemoryProbe | None:
        """How start-up measures memory: torch.cuda's counters on a GPU; nothing on CPU."""
        return startup.cuda_memory(self.device) if self.device.type == "cuda" else None

    def _profile(self, probe: startup.MemoryProbe, graphs: DecodeGraphs | None) -> startup.MemoryPlan:
        """The largest prefill on a temporary cache (its peak), and the largest bucket's graph on
        it (what the graphs hold): both measured before the KV cache is sized."""
        block_size = self.config.block_size
        batch, blocks = startup.largest_prefill(self._prefill_tokens, self.config.max_num_seqs, self.max_model_len,
                                                block_size, self.spec.vocab_size)
        temporary = self._allocate_kv_caches(blocks + 1)
        runner = ModelRunner(self.model, temporary, self.ops, block_size)
        step_peak = startup.profile_step(lambda: runner.run(batch), probe)
        graph_bytes = 0
        if graphs is not None:  # what the largest graph holds, with the device batch's rows it reads
            graph_bytes = startup.measure_graphs(
                lambda: graphs.capture_buckets(temporary, DeviceBatch(self.device), [graphs.buckets[-1]]),
                graphs.release, probe)
        del runner, temporary
        probe.release()
        free = probe.free()
        return startup.MemoryPlan(free=free, step_peak=step_peak, graph_bytes=graph_bytes,
                                  kv_cache=startup.kv_cache_bytes(free, step_peak, graph_bytes))

    def _num_kv_blocks(self, block_size: int, probe: startup.MemoryProbe | None,
                       graphs: DecodeGraphs | None) -> int:
        self.memory_plan = None
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = 2 * self.spec.num_layers * block_size * self.model.kv_heads * self.spec.head_dim
        per_block *= torch.empty((), dtype=self.dtype).element_size()
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif probe is not None:
            self.memory_plan = self._profile(probe, graphs)
            budget = self.memory_plan.kv_cache
            if budget < per_block:
                plan = self.memory_plan
                raise ElasticDecodeError(
                    f"not enough device memory for a KV cache: {plan.free / 2**30:.2f} GiB free after the weights, "
                    f"the largest step needs {plan.step_peak / 2**30:.2f} GiB and the CUDA graphs "
                    f"{(plan.graph_bytes or 0) / 2**30:.2f} GiB (lower max_num_batched_tokens or max_num_seqs, "
                    "or turn cuda_graphs off)")
        else:
            budget = 2**30
        # No need for more than every sequence at full length.
        most = self.config.max_num_seqs * ((self.max_model_len + block_size - 1) // block_size)
        return max(1, min(int(budget // per_block), most))

    # -- requests ---------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Tokens one sequence may hold (prompt + completion): the context window, or the KV cache
        if that is smaller."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> tuple[tuple[int, ...], int]:
        """Validate a request without queueing it; returns (marker ids, max new tokens)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        vocab = self.spec.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        window = self.window
        room = window - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens but the context window is {window} tokens "
                "(prompt + completion)", param="prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed the context window of "
                f"{window} tokens; lower max_tokens to {room} or less, or leave it unset (the window)", param="max_tokens")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}", param="stop_token_ids")
        marker = self.tokenizer.marker(params.end_think)
        if any(t >= vocab for t in marker):
            raise InvalidRequestError(f"end_think token ids must be below the vocabulary size {vocab}", param="end_think")
        if len(marker) > MAX_MARKER_TOKENS:
            raise InvalidRequestError(f"end_think is {len(marker)} tokens long; at most {MAX_MARKER_TOKENS} are supported",
                                      param="end_think")
        return marker, room if params.max_tokens is None else params.max_tokens

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None) -> int:
        marker, max_new = self.check_request(prompt_ids, params)
        self.wake_up()  # a sleeping engine comes back on its own when given work
        stop_ids = tuple(dict.fromkeys((() if params.ignore_eos else self.tokenizer.eos_ids) + params.stop_token_ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)

        request = Request(next(self._ids), prompt, list(prompt_ids), params)
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request.request_id,
                sample_index=i,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                params=params,
                seed=_sample_seed(seed, i),
                marker=marker,
                stop_ids=stop_ids,
                max_new_tokens=max_new,
            )
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        return request.request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting, KV blocks in use, free and in all, preemptions so far."""
        scheduler, blocks = self.scheduler, self.block_manager
        total = blocks.allocator.num_blocks
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_blocks_used": total - blocks.num_free, "kv_blocks_free": blocks.num_free, "kv_blocks_total": total,
                "preemptions": scheduler.num_preemptions}

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape `load_weights` takes for the HF weight `name` (the full tensor, also under tensor
        parallelism); None for a name it skips; ModelLoadError for one this model does not have."""
        return self.model.hf_shape(name, self._params)

    def abort_request(self, request_id: int) -> None:
        """Drop a request whatever its state: its sequences leave the scheduler, their KV blocks
        are freed at once. Unknown (or finished) ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request.seqs)

    def stop_sequence(self, request_id: int, index: int) -> RequestOutput | None:
        """End completion `index` of a request now, as a stop would (its caller found a stop string
        in its text); its blocks are freed. Returns the request's output if that was its last one."""
        request = self.requests.get(request_id)
        if request is None or request.seqs[index].status is SequenceStatus.FINISHED:
            return None
        self.scheduler.stop(request.seqs[index])
        if not request.finished:
            return None
        del self.requests[request_id]
        return self._request_output(request)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished with it (none when idle)."""
        if not self.has_unfinished():
            return []
        batch = self.last_batch = self.scheduler.schedule()
        result = self.runner.run(batch)
        bad = result.finish.count(FINISH_NONFINITE)
        if bad:
            raise NonFiniteLogitsError(
                f"the model produced non-finite logits (NaN or inf) for {bad} of {len(batch.seqs)} sequences; its "
                "weights are likely non-finite (check the checkpoint, or the tensors given to load_weights)")
        finished = self.scheduler.postprocess(batch, result)
        outputs = []
        for request_id in dict.fromkeys(s.request_id for s in finished):
            request = self.requests[request_id]
            if request.finished:
                del self.requests[request_id]
                outputs.append(self._request_output(request))
        return outputs

    # -- outputs ----------------------------------------------------------------------

    def _completion(self, seq: Sequence) -> CompletionOutput:
        out = seq.output_ids
        decode = self.tokenizer.decode
        if seq.params.think_budget is None:
            thinking, solution = [], out
        else:
            # Thinking tokens come first, then the k marker tokens, then the solution.
            thinking = out[: seq.think_count]
            solution = out[seq.think_count + len(seq.marker) :]
        return CompletionOutput(
            index=seq.sample_index,
            text=decode(out),
            thinking_text=decode(thinking),
            solution_text=decode(solution),
            token_ids=list(out),
            logprobs=list(seq.logprobs),
            forced_mask=list(seq.forced_mask),
            think_tokens=seq.think_count if seq.params.think_budget is not None else 0,
            solution_tokens=seq.solution_count,
            forced_end=bool(seq.forced_end),
            finish_reason="stop" if seq.finish == FINISH_STOP else "length",
            top_logprobs=[list(row) for row in seq.top_logprobs] if seq.params.logprobs else None,
        )

    def _request_output(self, request: Request) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=[self._completion(s) for s in request.seqs],
        )

    # -- weights ----------------------------------------------------------------------

    def load_weights(self, named_tensors) -> int:
        """Update weights in place (HF names), all or nothing; K/V of the old weights is dropped."""
        if self.workers is None:
            count = self.model.load_weights(named_tensors, all_or_nothing=True)
        else:  # checked whole here, then every rank takes its slice of each full tensor
            pairs = self.model.check_weights(named_tensors)
            self.workers.send(("load", [(name, tuple(t.shape), t.dtype) for name, t, _ in pairs]))
            with torch.no_grad():
                for name, tensor, target in pairs:
                    full = self.workers.group.broadcast(tensor.detach().to(self.device).contiguous())
                    target.copy_(self.model.shard.take(name, full))
            count = len(pairs)
        self.ops.prepare_linear(*self.model.linear_weights())
        # K/V computed under the old weights, cached or in flight, is stale: running sequences are
        # prefilled again (with their tokens and budget state) at the next step.
        self.scheduler.recompute_running()
        self.block_manager.reset_prefix_cache()
        return count
