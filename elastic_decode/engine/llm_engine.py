"""The engine: load a model, accept requests at any time, step until they finish.

request -> scheduler (core/) -> model runner (worker/) -> model (kernels) -> sampler + budget -> outputs.

The engine owns the request table and the scheduler (only the scheduler changes a Sequence); the
runner owns the model's device state (the KV cache, the CUDA graphs, the weights' prepared form) and
is asked, never reached into. Callers read the engine through what it offers: `stats()`, `request()`,
`check_request()`, `weight_shape()`.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import weakref
from dataclasses import dataclass, field

import torch

from elastic_decode.kernels import FINISH_NONFINITE, MAX_MARKER_TOKENS, SOLVING

from ..config import EngineConfig
from ..core.block_manager import BlockManager
from ..core.scheduler import Scheduler
from ..core.resume import StartState, start_state
from ..core.sequence import Sequence, SequenceStatus
from ..core.step import ScheduledBatch
from ..distributed import Workers, WorkerSpec, check_sizes
from ..distributed.weight_group import WeightGroup, check_join, check_update
from ..errors import ElasticDecodeError, InvalidRequestError, NonFiniteLogitsError
from ..models import ModelSpec
from ..models.loader import build_model, resolve_checkpoint
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from ..worker.backend import check_kernel_shapes, select_ops
from ..worker.cuda_graphs import DecodeGraphs, wants_cuda_graphs
from ..worker.device_batch import DeviceBatch
from ..worker.model_runner import ModelRunner, allocate_kv_caches
from . import startup
from .early_exit import EarlyExits
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
    exits: object = None  # early_exit.RequestExits

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig

        self.config = config
        path = resolve_checkpoint(config.model)
        hf_config = AutoConfig.from_pretrained(path)
        self.spec = ModelSpec.from_hf_config(hf_config)
        self.device = startup.pick_device(config.device)
        self.dtype = startup.pick_dtype(config.dtype, self.device, hf_config, config.quantization)
        self.ops = select_ops(self.device, config.backend, config.quantization)
        check_kernel_shapes(self.spec, self.ops.name)
        self.tokenizer = Tokenizer(path, hf_config)
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)

        check_sizes(self.spec, config.tensor_parallel_size, self.device)
        self.workers = None
        if config.tensor_parallel_size > 1:
            self._check_parallel_settings()
            self.workers = Workers(config.tensor_parallel_size, WorkerSpec(
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
        if self.device.type == "cuda" and self.ops.name == "triton":
            startup.compile_kernels(self.spec, block_size, self.dtype, self.device)  # no request pays a compile
        self.num_kv_blocks = self._num_kv_blocks(self._memory_probe(), graphs)
        if self.memory_plan is not None and self.memory_plan.graph_bytes is None:
            graphs = None  # the capture failed while measuring it: decode eagerly
        if self.workers is not None:
            self.workers.send(("kv", self.num_kv_blocks))
        self.kv_capacity_tokens = self.num_kv_blocks * block_size
        if self.kv_capacity_tokens < self.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than the %d-token context window: a prompt and its "
                        "completion are limited to %d tokens (raise kv_cache_memory_gb or num_kv_blocks)",
                        self.kv_capacity_tokens, self.max_model_len, self.kv_capacity_tokens)
        self.block_manager = BlockManager(self.num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=self._prefill_tokens, num_steps=config.num_scheduler_steps)
        self.runner = ModelRunner(self.model, allocate_kv_caches(self.model, self.num_kv_blocks, block_size),
                                  self.ops, block_size, graphs, self.workers)
        self.runner.capture_graphs()
        self.requests: dict[int, Request] = {}
        # The weights' version: "0" as loaded, then what each update names (or the count of updates).
        self.weight_version = "0"
        self._updates = 0
        self._weight_groups: dict[str, WeightGroup] = {}  # trainers' groups this engine receives weights over
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.last_batch: ScheduledBatch | None = None  # what the latest step ran (for metrics)
        self.early_exits = EarlyExits(self)

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
        return self.runner.sleeping

    def sleep(self) -> None:
        """Free the KV cache (e.g. while a trainer runs its backward pass); weights stay."""
        if self.has_unfinished():
            raise ElasticDecodeError("cannot sleep with requests in flight")
        self.runner.free_kv_cache()
        if self.workers is not None:
            self.workers.send(("sleep",))
        self.block_manager.reset_prefix_cache()  # its cached K/V are gone with the memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allocate the KV cache again after `sleep`."""
        if self.sleeping:
            if self.workers is not None:
                self.workers.send(("wake",))
            self.runner.allocate_kv_cache(self.num_kv_blocks)

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
        temporary = allocate_kv_caches(self.model, blocks + 1, block_size)
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

    def _num_kv_blocks(self, probe: startup.MemoryProbe | None, graphs: DecodeGraphs | None) -> int:
        config, block_size = self.config, self.config.block_size
        self.memory_plan = None
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = 2 * self.spec.num_layers * block_size * self.model.kv_heads * self.spec.head_dim
        per_block *= torch.empty((), dtype=self.dtype).element_size()
        if config.kv_cache_memory_gb is not None:
            budget = config.kv_cache_memory_gb * 2**30
        elif probe is not None:
            self.memory_plan = self._profile(probe, graphs)
            budget = self.memory_plan.kv_cache
        else:
            budget = 2**30
        return startup.num_kv_blocks(budget, per_block, config.max_num_seqs, self.max_model_len, block_size,
                                     self.memory_plan)

    # -- requests ---------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Tokens one sequence may hold (prompt + completion): the context window, or the KV cache
        if that is smaller."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> tuple[tuple[int, ...], int, StartState]:
        """Validate a request without queueing it; returns (marker ids, max new tokens, the budget machine's
        start: where a resubmitted rollout stands)."""
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
                f"{window} tokens; lower max_tokens to {room} or less, or leave it unset (the window)",
                param="max_tokens")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}",
                                      param="stop_token_ids")
        marker = self.tokenizer.marker(params.end_think)
        if any(t >= vocab for t in marker):
            raise InvalidRequestError(f"end_think token ids must be below the vocabulary size {vocab}",
                                      param="end_think")
        if len(marker) > MAX_MARKER_TOKENS:
            raise InvalidRequestError(f"end_think is {len(marker)} tokens long; at most {MAX_MARKER_TOKENS} are "
                                      "supported", param="end_think")
        if params.think_spent is not None and params.think_spent > len(prompt_ids):
            raise InvalidRequestError(f"think_spent ({params.think_spent}) is more than the prompt's {len(prompt_ids)} "
                                      "tokens: the spent thinking is the prompt's tail", param="think_spent")
        start = start_state(prompt_ids, marker, params, self.tokenizer.assistant_start, self.tokenizer.think_open,
                            self.tokenizer.eos_ids)
        s = params.solution_budget
        if s is not None and start.phase == SOLVING and start.solution_count >= s:
            raise InvalidRequestError(f"the rollout has {start.solution_count} solution tokens already (its prompt, or "
                                      f"solution_spent) and its solution budget is {s}: nothing is left to generate",
                                      param="solution_budget")
        return marker, room if params.max_tokens is None else params.max_tokens, start

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None) -> int:
        marker, max_new, start = self.check_request(prompt_ids, params)
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
            seq.start_from(start)
            request.seqs.append(seq)
        for seq in self.early_exits.start(request):
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        return request.request_id

    def request(self, request_id: int) -> Request | None:
        """A request in flight (read it; only the engine changes it), None once finished or aborted."""
        return self.requests.get(request_id)

    def request_ids(self) -> set[int]:
        """The requests in flight."""
        return set(self.requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting, KV blocks in use, free and in all, preemptions so far."""
        scheduler, blocks = self.scheduler, self.block_manager
        total = blocks.allocator.num_blocks
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_blocks_used": total - blocks.num_free, "kv_blocks_free": blocks.num_free, "kv_blocks_total": total,
                "preemptions": scheduler.num_preemptions}

    def abort_request(self, request_id: int) -> None:
        """Drop a request whatever its state: its sequences leave the scheduler, their KV blocks
        are freed at once. Unknown (or finished) ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request.seqs)
            self.early_exits.abort(request)

    def stop_sequence(self, request_id: int, index: int) -> RequestOutput | None:
        """End completion `index` of a request now, as a stop would (its caller found a stop string
        in its text); its blocks are freed. Returns the request's output if that was its last one."""
        request = self.requests.get(request_id)
        if request is None or request.seqs[index].status is SequenceStatus.FINISHED:
            return None
        self.scheduler.stop(request.seqs[index])
        self.early_exits.trace_ended(request, request.seqs[index])  # its probe, a warm-up it ends
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
        finished = self.scheduler.postprocess(batch, result, self.weight_version)
        finished = self.early_exits.after_step(batch.seqs, finished)
        outputs = []
        for request_id in dict.fromkeys(s.request_id for s in finished):
            request = self.requests[request_id]
            if request.finished:
                del self.requests[request_id]
                outputs.append(self._request_output(request))
        return outputs

    # -- outputs ----------------------------------------------------------------------

    def _completion(self, seq: Sequence) -> CompletionOutput:
        decode = self.tokenizer.decode
        lowest, tail = seq.group_confidence
        thinking, _, solution = seq.output_parts()
        return CompletionOutput(
            index=seq.sample_index,
            text=decode(seq.output_ids),
            thinking_text=decode(thinking),
            solution_text=decode(solution),
            token_ids=list(seq.output_ids),
            logprobs=list(seq.logprobs),
            forced_mask=list(seq.forced_mask),
            think_tokens=seq.think_tokens,
            solution_tokens=seq.solution_count,
            forced_end=bool(seq.forced_end),
            finish_reason=seq.finish_reason,
            top_logprobs=[list(row) for row in seq.top_logprobs] if seq.params.logprobs else None,
            weight_versions=list(seq.weight_versions),
            confidences=list(seq.confidences) if seq.params.wants_confidence else None,
            lowest_group_confidence=lowest,
            tail_confidence=tail,
            early_exit=seq.early_exit,
            exit_index=seq.exit_index,
            probes=seq.probes,
            probe_confidences=list(seq.probe_log) if seq.params.early_stop == "deer" else None,
        )

    def _request_output(self, request: Request) -> RequestOutput:
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=[self._completion(s) for s in request.seqs],
            prompt_logprobs=first.prompt_logprobs,
            prompt_top_logprobs=first.prompt_top_logprobs,
            cached_tokens=first.cached_tokens or 0,
            tokens_spent=self.early_exits.tokens_spent(request),
            deepconf_threshold=request.exits.threshold,
        )

    # -- weights ----------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """Parameters of the whole model (every rank's, under tensor parallelism: the HF count)."""
        return sum(math.prod(shape) for shape in (self.weight_shape(n) for n, _ in self.model.hf_named_parameters())
                   if shape is not None)

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape `load_weights` takes for the HF weight `name` (the full tensor, also under tensor
        parallelism); None for a name it skips; ModelLoadError for one this model does not have."""
        return self.model.hf_shape(name, self._params)

    def check_weights(self, named_tensors) -> list:
        """Check HF-named weights as `load_weights` would (names, shapes, dtypes, values), changing nothing."""
        return self.model.check_weights(named_tensors)

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes (their K/V stays valid for the sequences holding it)."""
        self.block_manager.reset_prefix_cache()

    def load_weights(self, named_tensors, version: str | None = None) -> int:
        """Update weights in place (HF names), all or nothing; K/V of the old weights is dropped. `version`
        names the new weights (default: the count of updates so far); every later token carries it."""
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
        self._updated(version)
        return count

    def _updated(self, version: str | None) -> None:
        self.runner.prepare_weights()
        # K/V computed under the old weights, cached or in flight, is stale: running sequences are
        # prefilled again (with their tokens and budget state) at the next step.
        self.scheduler.recompute_running()
        self.block_manager.reset_prefix_cache()
        self._updates += 1
        self.weight_version = str(version) if version is not None else str(self._updates)

    # -- weights from a trainer's process group (distributed/weight_group.py) ------------------------

    def join_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str, backend: str) -> None:
        """Join the group a trainer opens to send weights: rank `rank_offset` here, and the next ranks on the
        tensor-parallel workers. Blocks until every rank (the trainer's included) has joined."""
        if group_name in self._weight_groups:
            raise ElasticDecodeError(f"a weight update group named {group_name!r} exists already")
        check_join(rank_offset, self.config.tensor_parallel_size, world_size, backend, self.device)
        if self.workers is not None:
            self.workers.send(("weight_group_join", master_address, master_port, rank_offset, world_size, group_name,
                               backend))
        group, error = None, None
        try:
            group = WeightGroup.join(master_address, master_port, rank_offset, world_size, group_name, backend,
                                     self.device)
        except Exception as e:  # noqa: BLE001 - the workers hear of it below, then it is raised
            error = e
        if not self._all_ok(error is None):  # a rank failed: every rank drops what it joined
            self._drop_group(group_name, group)
            raise error or ElasticDecodeError("a tensor-parallel worker could not join the weight update group "
                                              "(its stderr says why); nothing was joined")
        self._weight_groups[group_name] = group

    def load_weights_from_group(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                version: str | None = None) -> int:
        """Receive the tensors a trainer broadcasts over `group_name` (in the order named) and load them, all or
        nothing: every rank receives them whole, then rank 0 checks them and each rank keeps its slice.
        Whatever the trainer broadcasts is received (so the group stays in step for the next update), then
        refused if the model has no such weight or shape. A broadcast that breaks partway (the trainer gone,
        a timeout) leaves the group out of step: it is dropped on every rank."""
        group = self._weight_group(group_name)
        check_update(names, dtypes, shapes)  # before any rank receives: a bad dtype or shape cannot be
        if self.workers is not None:
            self.workers.send(("weight_group_recv", group_name, names, dtypes, shapes))
        tensors, error = None, None
        try:
            tensors = group.receive(names, dtypes, shapes)
        except Exception as e:  # noqa: BLE001 - the workers hear of it below, then it is raised
            error = e
        if not self._all_ok(error is None):
            self._send_apply([])
            del self._weight_groups[group_name]
            self._drop_group(group_name, group)
            raise error or ElasticDecodeError("a tensor-parallel worker's receive failed (its stderr says why); the "
                                              f"group {group_name!r} is out of step and was dropped: join again")
        try:
            pairs = self.model.check_weights(tensors)
        except BaseException:
            self._send_apply([])
            raise
        applied = self._send_apply([name for name, _, _ in pairs], local=pairs)  # a name the model skips is not
        if not applied:
            raise ElasticDecodeError("a tensor-parallel worker failed to apply the update (its stderr says why): the "
                                     "ranks now hold different weights; load the weights again")
        self._updated(version)
        return len(pairs)

    def _send_apply(self, names: list[str], local=()) -> bool:
        """The workers apply `names` of what they received (none: drop it), rank 0 its `local` pairs; whether
        every rank succeeded."""
        if self.workers is not None:
            self.workers.send(("weight_group_apply", names))
        with torch.no_grad():
            for name, tensor, target in local:
                target.copy_(self.model.shard.take(name, tensor) if self.model.shard else tensor)
        return self._all_ok(True)

    def _all_ok(self, ok: bool) -> bool:
        return self.workers.group.all_ok(ok) if self.workers is not None else ok

    def _drop_group(self, group_name: str, group: WeightGroup | None) -> None:
        """Every rank leaves `group_name` (those that joined it)."""
        if self.workers is not None:
            self.workers.send(("weight_group_destroy", group_name))
        if group is not None:
            try:
                group.destroy()
            except Exception:  # noqa: BLE001, S110 - a broken group may fail to close; it is forgotten anyway
                pass

    def destroy_weight_group(self, group_name: str) -> None:
        group = self._weight_group(group_name)
        del self._weight_groups[group_name]
        self._drop_group(group_name, group)

    def _weight_group(self, name: str) -> WeightGroup:
        if name not in self._weight_groups:
            known = ", ".join(map(repr, self._weight_groups)) or "none"
            raise ElasticDecodeError(f"no weight update group named {name!r} (open ones: {known}); "
                                     "/init_weights_update_group first")
        return self._weight_groups[name]
