"""The public API: `LLM(...).generate / chat / generate_tensors / load_weights`."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from .config import BUDGET_MODES, EngineConfig
from .distributed import Replicas
from .engine import LLMEngine
from .engine.startup import pick_device
from .engine.two_call import run_two_call
from .errors import ElasticDecodeError, InvalidRequestError
from .outputs import GenerationStats, RequestOutput
from .sampling_params import SamplingParams
from .utils.jsonl import check_conversation

Prompt = str | Sequence[int]


@dataclass
class RolloutBatch:
    """Padded tensors of a batch of completions, for trainers.

    Rows are grouped by prompt: row `i * n + j` is sample j of prompt i. Padding is on the
    right; `completion_mask` marks real tokens.
    """

    prompt_ids: list[list[int]]  # one entry per row (the row's prompt)
    completion_ids: torch.Tensor  # int64 [rows, max_len]; pad_token_id past the end
    logprobs: torch.Tensor  # float32 [rows, max_len]; 0 past the end
    completion_mask: torch.Tensor  # int32 [rows, max_len]; 1 for real tokens
    forced_mask: torch.Tensor  # int32 [rows, max_len]; 1 for tokens the engine forced
    think_tokens: torch.Tensor  # int64 [rows]
    solution_tokens: torch.Tensor  # int64 [rows]
    forced_end: torch.Tensor  # bool [rows]
    truncated: torch.Tensor  # bool [rows]; finish_reason == "length"
    prompt_index: torch.Tensor  # int64 [rows]; which prompt the row belongs to
    thinking_texts: list[str]  # one per row: the text before the end-of-thinking marker
    solution_texts: list[str]  # one per row: the text after it (where answers are graded)
    # one per row: the weights each token came from, as (first token index, version) runs (a row that spans
    # an in-flight update has two or more: LLM.load_weights_in_flight)
    weight_versions: list[list[tuple[int, str]]] = dataclasses.field(default_factory=list)


def rollout_batch(outputs: Sequence[RequestOutput], pad_id: int) -> RolloutBatch:
    """The padded tensors of finished requests (each prompt's completions in a row)."""
    rows = [(i, o, c) for i, o in enumerate(outputs) for c in o.outputs]
    width = max(1, max(len(c.token_ids) for _, _, c in rows))
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    logprobs = torch.zeros(n, width, dtype=torch.float32)
    mask = torch.zeros(n, width, dtype=torch.int32)
    forced = torch.zeros(n, width, dtype=torch.int32)
    for r, (_, _, c) in enumerate(rows):
        length = len(c.token_ids)
        ids[r, :length] = torch.tensor(c.token_ids, dtype=torch.long)
        logprobs[r, :length] = torch.tensor(c.logprobs, dtype=torch.float32)
        mask[r, :length] = 1
        forced[r, :length] = torch.tensor(c.forced_mask, dtype=torch.int32)
    return RolloutBatch(
        prompt_ids=[o.prompt_token_ids for _, o, _ in rows],
        completion_ids=ids,
        logprobs=logprobs,
        completion_mask=mask,
        forced_mask=forced,
        think_tokens=torch.tensor([c.think_tokens for _, _, c in rows], dtype=torch.long),
        solution_tokens=torch.tensor([c.solution_tokens for _, _, c in rows], dtype=torch.long),
        forced_end=torch.tensor([c.forced_end for _, _, c in rows], dtype=torch.bool),
        truncated=torch.tensor([c.finish_reason == "length" for _, _, c in rows], dtype=torch.bool),
        prompt_index=torch.tensor([i for i, _, _ in rows], dtype=torch.long),
        thinking_texts=[c.thinking_text for _, _, c in rows],
        solution_texts=[c.solution_text for _, _, c in rows],
        weight_versions=[list(c.weight_versions or []) for _, _, c in rows],
    )


@dataclass(eq=False)
class _PendingUpdate:
    """A weight update handed to a running generate call (LLM.load_weights_in_flight)."""

    named_tensors: Iterable[tuple[str, torch.Tensor]]
    version: str | None
    done: Future = dataclasses.field(default_factory=Future)


class LLM:
    """Offline budgeted generation.

    >>> llm = LLM()  # the embedded SmolLM2-135M-Instruct
    >>> out = llm.chat([{"role": "user", "content": "2+2?"}],
    ...                SamplingParams(think_budget=64, solution_budget=32))
    """

    def __init__(self, model: str | None = None, *, budget_mode: str = "in-kernel", data_parallel_size: int = 1,
                 **engine):
        """`model`: a checkpoint directory, a .gguf file, or None for the embedded model. `engine`: the
        EngineConfig fields (dtype, device, backend, quantization, seed, block_size, max_model_len,
        max_num_seqs, max_num_batched_tokens, num_kv_blocks, kv_cache_memory_gb, num_scheduler_steps,
        cuda_graphs, enforce_eager, tensor_parallel_size, tensor_parallel_timeout_s; config.py says what
        each is for). `budget_mode`: "in-kernel" or "two-call" (config.BUDGET_MODES). `data_parallel_size`:
        engine replicas, each in a process of its own but this one."""
        if budget_mode not in BUDGET_MODES:
            raise InvalidRequestError(f"budget_mode must be one of {', '.join(BUDGET_MODES)}, got {budget_mode!r}")
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise InvalidRequestError(f"data_parallel_size must be a positive integer, got {data_parallel_size!r}")
        unknown = set(engine) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise InvalidRequestError(f"LLM got unknown argument(s) {', '.join(sorted(unknown))}; it takes model, "
                                      "budget_mode, data_parallel_size and EngineConfig's fields")
        config = EngineConfig(model=model, **engine)
        self.budget_mode = budget_mode
        tp = config.tensor_parallel_size
        if tp * data_parallel_size > 1 and pick_device(config.device).type == "cpu":
            # The engine's processes share the cores: oversubscribed torch threads spin against each other.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (tp * data_parallel_size)))
        self.engine = LLMEngine(config)
        self.last_stats: GenerationStats | None = None
        self._lock = threading.RLock()  # one caller at a time (see _run)
        # Weight updates another thread hands to a running generate call (load_weights_in_flight): applied
        # between two of its steps. `_generating` says whether a call would see them (under `_pending_lock`).
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingUpdate] = []
        self._generating = False
        self._cancel = threading.Event()  # cancel_running(): the running call stops at its next step
        self.replicas = None
        if data_parallel_size > 1:
            if budget_mode == "two-call":
                raise InvalidRequestError("budget_mode two-call runs on one replica: use data_parallel_size 1")
            # A replica is this LLM again: its engine's settings (but the timeout) and the budget mode.
            self._start_replicas(data_parallel_size, {
                **{f.name: getattr(config, f.name) for f in fields(config) if f.name != "tensor_parallel_timeout_s"},
                "budget_mode": budget_mode})

    def _start_replicas(self, size: int, kwargs: dict) -> None:
        """Replicas 1..size-1 of this engine in processes of their own (this LLM's engine is replica 0);
        on CUDA replica r takes the GPUs from r * tensor_parallel_size on."""
        tp, device = kwargs["tensor_parallel_size"], self.engine.device
        if device.type == "cuda" and size * tp > torch.cuda.device_count():
            self.engine.close()
            raise InvalidRequestError(f"data_parallel_size {size} x tensor_parallel_size {tp} needs {size * tp} GPUs; "
                                      f"this machine has {torch.cuda.device_count()}")
        replicas = []
        for r in range(1, size):
            replica = dict(kwargs)
            if device.type == "cuda":
                replica["device"] = f"cuda:{(device.index or 0) + r * tp}"
            if kwargs["seed"] is not None:  # unseeded requests get different random seeds on each replica
                replica["seed"] = kwargs["seed"] + r
            replicas.append(replica)
        try:
            self.replicas = Replicas(size, replicas, self.engine.config.tensor_parallel_timeout_s)
        except BaseException:
            self.engine.close()
            raise

    @property
    def tokenizer(self):
        return self.engine.tokenizer.hf

    # -- entry points -----------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_finished: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Raw text prompts (tokenized with the model's special tokens) or token-id lists.

        `on_finished(index, output)` is called as each prompt's request finishes (in finishing
        order; index is the prompt's position), so a caller can keep results an interrupt or a later
        error would otherwise lose."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
        encoded = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                encoded.append((p, self.engine.tokenizer.encode(p) if p else []))
            elif isinstance(p, Sequence) and not isinstance(p, bytes):
                encoded.append((None, list(p)))
            else:
                raise InvalidRequestError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        return self._run(encoded, params, use_tqdm, on_finished)

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_finished: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Conversations (lists of {"role", "content"}) through the model's chat template."""
        if not isinstance(conversations, Sequence) or isinstance(conversations, str):
            raise InvalidRequestError(
                f"conversations must be a list of messages or a list of those, got {type(conversations).__name__}")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        encoded = [(None, self.encode_chat(messages)) for messages in conversations]
        return self._run(encoded, params, use_tqdm, on_finished)

    def generate_tensors(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        use_tqdm: bool = False,
    ) -> RolloutBatch:
        """Token ids in, padded tensors out (rows grouped by prompt, `params.n` per prompt; one
        SamplingParams for all prompts or one per prompt)."""
        outputs = self._run([(None, list(p)) for p in prompt_token_ids], params, use_tqdm)
        return rollout_batch(outputs, self.engine.tokenizer.pad_id)

    def encode(self, text: str) -> list[int]:
        """A raw text prompt's token ids (with the model's special tokens, as `generate` does)."""
        if not text:
            raise InvalidRequestError("empty prompt")
        return self.engine.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation's prompt token ids through the chat template (for `generate_tensors`)."""
        check_conversation(messages)
        return self.engine.tokenizer.encode_chat(list(messages))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str | None = None) -> int:
        """Copy HF-named weights (e.g. a trainer model's `named_parameters()`) in place. All or
        nothing: every name, shape and value is checked before any weight changes. `version` names
        the new weights (default: the count of updates); every later token carries it."""
        with self._lock:
            if self.replicas is None:
                return self.engine.load_weights(named_tensors, version)
            # Checked here first (all or nothing), then every replica loads the same tensors.
            named = [(name, t.detach().to("cpu")) for name, t in named_tensors]
            self.engine.check_weights(named)
            self.replicas.everywhere(("load", named))
            return self.engine.load_weights(named, version)

    def load_weights_in_flight(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                               version: str | None = None) -> int:
        """`load_weights` from another thread while a generate call runs: the call applies the update
        between two of its steps (pause keep, load, resume, as an RL server takes an in-flight update),
        and its sequences go on under the new weights (their K/V recomputed); the tokens before keep
        their logprobs and version, the later ones carry `version`. Applied at once when no call runs;
        returns once applied (the tensors may change afterwards). With data-parallel replicas or
        two-call budgets, as `load_weights` (after the running call)."""
        if self.replicas is not None or self.budget_mode == "two-call":
            return self.load_weights(named_tensors, version)
        update = _PendingUpdate(named_tensors, version)
        with self._pending_lock:
            self._pending.append(update)
            running = self._generating
        if not running:  # no call will see it: apply it here (after any call that starts meanwhile)
            with self._lock:
                self._apply_pending()
        return update.done.result()

    def _apply_pending(self) -> None:
        """Apply the handed-over updates, in order (the caller holds `_lock`)."""
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                update = self._pending.pop(0)
            try:
                update.done.set_result(self.engine.load_weights(update.named_tensors, update.version))
            except Exception as e:  # noqa: BLE001 - the updating thread gets it
                update.done.set_exception(e)
            except BaseException as e:  # Ctrl-C here: the updating thread hears of it, and so does this one
                update.done.set_exception(e)
                raise

    def cancel_running(self) -> None:
        """Stop the generate call running on another thread at its next step: it raises
        ElasticDecodeError("cancelled") there, its requests leave the engine. Nothing when none runs."""
        with self._pending_lock:
            if self._generating:
                self._cancel.set()

    def sleep(self) -> None:
        """Free the KV cache while something else needs the memory (e.g. a trainer's backward
        pass); the weights stay. The next generate call (or `wake_up`) allocates it again."""
        with self._lock:
            self.engine.sleep()
            if self.replicas is not None:
                self.replicas.everywhere(("sleep",))

    def wake_up(self) -> None:
        with self._lock:
            self.engine.wake_up()
            if self.replicas is not None:
                self.replicas.everywhere(("wake",))

    def close(self) -> None:
        """Stop the worker and replica processes now (otherwise done when the LLM is collected)."""
        with self._lock:
            if self.replicas is not None:
                self.replicas.stop()
                self.replicas = None
            self.engine.close()

    def __del__(self) -> None:
        replicas = getattr(self, "replicas", None)
        if replicas is not None:
            try:
                replicas.stop()
            except Exception:  # noqa: BLE001 - at interpreter exit; the replicas die with this process anyway
                pass

    # -- the loop ---------------------------------------------------------------------

    def _run(self, encoded: list[tuple[str | None, list[int]]], params, use_tqdm: bool,
             on_finished: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        if not encoded:
            raise InvalidRequestError("no prompts given")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(encoded)
        elif not isinstance(params, Sequence) or isinstance(params, str):
            raise InvalidRequestError(
                f"params must be a SamplingParams or a list of them (one per prompt), got {type(params).__name__}")
        elif len(params) != len(encoded):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(encoded)} prompts")
        # One caller at a time: the engine steps one batch of requests; a second thread waits. From
        # the moment the call holds the lock, weights handed over in flight are its to apply.
        with self._lock:
            with self._pending_lock:
                self._generating = True
                self._cancel.clear()
            try:
                return self._run_locked(encoded, list(params), use_tqdm, on_finished)
            finally:
                while True:  # no update handed over is left behind: none while the flag drops
                    with self._pending_lock:
                        if not self._pending:
                            self._generating = False
                            break
                    self._apply_pending()

    def _run_locked(self, encoded, params: list[SamplingParams], use_tqdm: bool, on_finished) -> list[RequestOutput]:
        engine = self.engine
        # Validate every prompt before any is queued, so one bad prompt wastes no work.
        for i, ((_, ids), p) in enumerate(zip(encoded, params)):
            try:
                engine.check_request(ids, p)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e}") from None
        start = time.perf_counter()
        preempted_before = engine.stats()["preemptions"]
        before = engine.request_ids()
        try:
            if self.budget_mode == "two-call":
                results = run_two_call(engine, self._generate_once, encoded, params, use_tqdm)
                if on_finished is not None:
                    for i, out in enumerate(results):
                        on_finished(i, out)
            elif self.replicas is not None:
                results = self._generate_data_parallel(encoded, params, use_tqdm, on_finished)
            else:
                results = self._generate_once(encoded, params, use_tqdm, on_finished)
        except BaseException:
            # Whatever stopped this call (an error, Ctrl-C, a callback raising), its requests
            # leave the engine with their blocks, so the next call starts as on a fresh engine.
            for request_id in engine.request_ids() - before:
                engine.abort_request(request_id)
            raise
        completions = [c for r in results for c in r.outputs]
        self.last_stats = GenerationStats(
            requests=len(results),
            completions=len(completions),
            prompt_tokens=sum(len(r.prompt_token_ids) for r in results),
            output_tokens=sum(len(c.token_ids) for c in completions),
            think_tokens=sum(c.think_tokens for c in completions),
            solution_tokens=sum(c.solution_tokens for c in completions),
            forced_tokens=sum(sum(c.forced_mask) for c in completions),
            forced_ends=sum(c.forced_end for c in completions),
            preemptions=engine.stats()["preemptions"] - preempted_before,
            seconds=time.perf_counter() - start,
            engine=f"{str(engine.dtype).removeprefix('torch.')} on {engine.device.type}, {engine.ops.name} kernels"
                   + (f", {engine.config.quantization} weights" if engine.config.quantization else ""),
        )
        return results

    def _generate_data_parallel(self, encoded, params: list[SamplingParams], use_tqdm: bool,
                                on_finished) -> list[RequestOutput]:
        """Prompts dealt round-robin to the replicas (a prompt's n completions stay together, sharing
        its KV on one replica); this process decodes its share while the others decode theirs."""
        size = self.replicas.size
        shares = [list(range(r, len(encoded), size)) for r in range(size)]
        for r in range(1, size):
            if shares[r]:  # token ids: the prompts' text is put back on the outputs here
                self.replicas.send(r, ("generate", [encoded[i][1] for i in shares[r]], [params[i] for i in shares[r]]))
        results: dict[int, RequestOutput] = {}
        local = shares[0]

        def keep(j: int, out: RequestOutput) -> None:
            results[local[j]] = out
            if on_finished is not None:
                on_finished(local[j], out)

        try:
            if local:
                self._generate_once([encoded[i] for i in local], [params[i] for i in local], use_tqdm, keep)
        finally:  # the replicas' answers are read even when this share failed, so none is left unread
            answers = {r: self._reply(r) for r in range(1, size) if shares[r]}
        for r, answer in answers.items():
            if isinstance(answer, BaseException):
                raise answer
            for i, out in zip(shares[r], answer):
                results[i] = out = dataclasses.replace(out, prompt=encoded[i][0])
                if on_finished is not None:
                    on_finished(i, out)
        return [results[i] for i in range(len(encoded))]

    def _reply(self, rank: int):
        try:
            return self.replicas.reply(rank)
        except ElasticDecodeError as e:
            return e

    def _generate_once(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams],
                       use_tqdm: bool, on_finished: Callable[[int, RequestOutput], None] | None = None
                       ) -> list[RequestOutput]:
        """Queue the (validated) requests and step the engine until all of them finish."""
        engine = self.engine
        start = time.perf_counter()
        order = [engine.add_request(ids, p, prompt=text) for (text, ids), p in zip(encoded, params)]
        index = {request_id: i for i, request_id in enumerate(order)}
        done: dict[int, RequestOutput] = {}
        tokens = 0
        with tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm, leave=False) as bar:
            while engine.has_unfinished():
                if self._cancel.is_set():  # _run_locked's handler aborts this call's requests
                    raise ElasticDecodeError("cancelled: cancel_running() was called")
                if self._pending:  # an update handed over by load_weights_in_flight (read without the lock:
                    self._apply_pending()  # one missed now is applied before the next step)
                for out in engine.step():
                    done[out.request_id] = out
                    tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
                    if on_finished is not None:
                        on_finished(index[out.request_id], out)
        return [done[i] for i in order]
