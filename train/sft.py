"""Supervised fine-tuning on reasoning traces, and distillation by rejection sampling.

`mode="sft"`: train on JSONL traces, loss on completion tokens only. A trace row is
`{"prompt"|"messages", "thinking", "solution"}`, encoded as the chat prompt, then
thinking tokens + the engine's end-of-thinking marker + solution tokens + EOS, so a model
trained on it closes its thinking with exactly the ids the engine matches (and forces);
or `{"prompt"|"messages", "completion"}`, taken as written (+ EOS).

`mode="distill"`: the teacher checkpoint answers `distill_prompts` prompts of the task through
the engine (`group_size` samples each, under the configured budgets); only completions whose
answer the task verifies as correct are kept (rejection sampling, as in the distillation recipe
of DeepSeek-R1, arXiv 2501.12948), written to `distill_traces.jsonl`, and the student
(`model`) is fine-tuned on them.
"""
from __future__ import annotations

import gc
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from elastic_decode import LLM, SamplingParams
from elastic_decode.errors import ElasticDecodeError
from elastic_decode.utils.jsonl import check_messages, read_jsonl
from elastic_decode.models.loader import resolve_checkpoint
from elastic_decode.engine.tokenizer import Tokenizer

from .config import GRPOConfig
from .loss import sft_loss
from .tasks import make_task
from .trainer import METRICS_FILE, PLOT_FILE, load_hf_model, resolve_dtypes, sequence_logprobs, write_checkpoint

DISTILL_FILE = "distill_traces.jsonl"


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]  # the chat prompt (conditioned on, no loss)
    completion_ids: list[int]  # what the loss is taken on (ends with EOS)


def read_trace_rows(path: str | Path) -> list[dict]:
    """Validated trace rows; any problem is one error naming the file and line."""
    rows = []
    for where, row in read_jsonl(path, "sft_data"):
        check_messages(row, where)
        if "messages" not in row and not (isinstance(row.get("prompt"), str) and row["prompt"].strip()):
            raise ElasticDecodeError(f'{where}: the row needs a non-empty "prompt" (text) or "messages" (chat)')
        has_pair = "thinking" in row or "solution" in row
        if has_pair == ("completion" in row):
            raise ElasticDecodeError(f'{where}: give either "thinking" and "solution", or "completion"')
        fields = ("thinking", "solution") if has_pair else ("completion",)
        for name in fields:
            if not isinstance(row.get(name), str):
                raise ElasticDecodeError(f'{where}: "{name}" must be a string')
        if not any(row[name].strip() for name in fields):
            raise ElasticDecodeError(f"{where}: the trace is empty")
        rows.append({**row, "_where": where})
    if not rows:
        raise ElasticDecodeError(f"sft_data {path} holds no traces")
    return rows


def encode_traces(rows: list[dict], tokenizer: Tokenizer, max_len: int) -> list[SFTExample]:
    """Prompt ids through the chat template; completion ids piece by piece (see the module doc)."""
    def piece(text: str) -> list[int]:
        return list(tokenizer.hf(text, add_special_tokens=False)["input_ids"]) if text else []

    marker = list(tokenizer.marker(None))
    eos = tokenizer.eos_ids[0]
    examples = []
    for row in rows:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        try:
            prompt = tokenizer.encode_chat(list(messages))
        except ElasticDecodeError as e:
            raise ElasticDecodeError(f"{row['_where']}: {e}") from None
        if "completion" in row:
            completion = piece(row["completion"]) + [eos]
        else:
            completion = piece(row["thinking"]) + marker + piece(row["solution"]) + [eos]
        if len(prompt) + len(completion) > max_len:
            raise ElasticDecodeError(f"{row['_where']}: {len(prompt) + len(completion)} tokens, more than the "
                                     f"model's {max_len}-token context")
        examples.append(SFTExample(prompt, completion))
    return examples


def collate(examples: list[SFTExample]) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Prompts as lists (left-padded later), completions right-padded: ids [B, T], mask [B, T]."""
    width = max(len(e.completion_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.int32)
    for r, e in enumerate(examples):
        ids[r, : len(e.completion_ids)] = torch.tensor(e.completion_ids)
        mask[r, : len(e.completion_ids)] = 1
    return [e.prompt_ids for e in examples], ids, mask


def distill_traces(config: GRPOConfig, out_path: Path, use_tqdm: bool) -> tuple[list[dict], str]:
    """Sample traces from the teacher and keep the verified-correct ones; returns (rows, summary)."""
    task = make_task(config.task)
    examples = task.sample(random.Random(f"{config.seed}-distill"), config.distill_prompts)
    teacher = LLM(config.teacher, dtype=config.dtype, device=config.device, seed=config.seed,
                  kv_cache_memory_gb=config.kv_cache_memory_gb, num_scheduler_steps=config.num_scheduler_steps,
                  cuda_graphs=config.cuda_graphs)
    params = SamplingParams(n=config.group_size, temperature=config.temperature, top_p=config.top_p,
                            think_budget=config.think_budget, solution_budget=config.solution_budget,
                            seed=config.seed)
    outputs = teacher.chat([list(ex.messages) for ex in examples], params, use_tqdm=use_tqdm)
    stats = teacher.last_stats
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kept, solved = [], 0
    for ex, out in zip(examples, outputs):
        good = [c for c in out.outputs if task.score(c.solution_text, ex, 0.0).correct]
        solved += bool(good)
        for c in good:
            kept.append({"messages": list(ex.messages), "thinking": c.thinking_text, "solution": c.solution_text,
                         "answer": ex.answer, "think_tokens": c.think_tokens, "forced_end": c.forced_end})
    total = sum(len(o.outputs) for o in outputs)
    summary = (f"teacher {config.teacher}: {len(kept)} of {total} traces verified correct "
               f"({solved} of {len(examples)} prompts solved at least once; {stats.output_tokens} tokens "
               f"in {stats.seconds:.1f} s)")
    if not kept:
        raise ElasticDecodeError(summary + ": nothing to distill (raise the budgets, the samples per prompt, or use "
                                           "a stronger teacher)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    return kept, summary


class SFTTrainer:
    """`SFTTrainer(config).train()` for config.mode in ("sft", "distill")."""

    def __init__(self, config: GRPOConfig, *, overwrite: bool = False, use_tqdm: bool = True):
        if config.mode not in ("sft", "distill"):
            raise ValueError(f"SFTTrainer runs mode sft or distill, not {config.mode!r}")
        self.config = config
        self.use_tqdm = use_tqdm
        self.output_dir = Path(config.output_dir)
        if (self.output_dir / METRICS_FILE).exists() and not overwrite:
            raise ValueError(f"{self.output_dir} already holds a run ({METRICS_FILE}); pick another --output-dir "
                             "or pass --overwrite")
        self.model_path = resolve_checkpoint(config.model)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(self.model_path)
        self.tokenizer = Tokenizer(self.model_path, hf_config)
        self.max_len = getattr(hf_config, "max_position_embeddings", None) or 2**31
        # sft: fail on a bad row before any model loads; distill: the traces come in train().
        self.examples = (encode_traces(read_trace_rows(config.sft_data), self.tokenizer, self.max_len)
                         if config.mode == "sft" else [])
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.step = 0

    def train(self) -> Path:
        cfg = self.config
        start = time.perf_counter()
        if cfg.mode == "distill":
            rows, summary = distill_traces(cfg, self.output_dir / DISTILL_FILE, self.use_tqdm)
            print(summary, file=sys.stderr)
            rows = [{**r, "_where": f"{DISTILL_FILE} row {i + 1}"} for i, r in enumerate(rows)]
            self.examples = encode_traces(rows, self.tokenizer, self.max_len)
        torch.manual_seed(cfg.seed)
        model = load_hf_model(self.model_path, self.device, trainable=True,
                              gradient_checkpointing=cfg.gradient_checkpointing)
        autocast = resolve_dtypes(cfg.dtype, self.device)[1]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        rng = random.Random(cfg.seed)
        batches = []
        for epoch in range(cfg.epochs):
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            batches += [(epoch + 1, order[i: i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / METRICS_FILE
        metrics_path.unlink(missing_ok=True)
        rows = []
        bar = tqdm(batches, desc=cfg.mode, unit="step", disable=not self.use_tqdm)
        for epoch, indices in bar:
            t0 = time.perf_counter()
            row = self._optimizer_step(model, optimizer, [self.examples[i] for i in indices], autocast)
            self.step += 1
            row = {"step": self.step, "epoch": epoch, **row, "seconds": time.perf_counter() - t0}
            rows.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        path = write_checkpoint(self.output_dir, self.step, model, self.tokenizer.hf, cfg, None)
        from .plot import plot_sft_metrics

        plot = plot_sft_metrics(metrics_path, self.output_dir / PLOT_FILE)
        print(self.summary(rows, time.perf_counter() - start, path, plot))
        return path

    def _optimizer_step(self, model, optimizer, examples: list[SFTExample], autocast) -> dict:
        cfg = self.config
        total = sum(len(e.completion_ids) for e in examples)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(examples), cfg.micro_batch_size):
            prompts, ids, mask = collate(examples[i: i + cfg.micro_batch_size])
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                logprobs, _ = sequence_logprobs(model, prompts, ids, mask, pad_id=0, temperature=1.0)
            loss, _ = sft_loss(logprobs, mask, total_tokens=total)
            loss.backward()
            loss_sum += loss.item()
        limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit).item()
        optimizer.step()
        return {"loss": loss_sum, "tokens": total, "rows": len(examples), "grad_norm": grad_norm}

    def summary(self, rows: list[dict], seconds: float, checkpoint: Path, plot: Path | None) -> str:
        quarter = max(1, len(rows) // 4)
        first = sum(r["loss"] for r in rows[:quarter]) / quarter
        last = sum(r["loss"] for r in rows[-quarter:]) / quarter
        tokens = sum(r["tokens"] for r in rows)
        return (f"{self.config.mode}: {len(rows)} steps ({self.config.epochs} epochs of {len(self.examples)} traces, "
                f"{tokens} loss tokens) in {seconds:.0f} s; loss {first:.3f} -> {last:.3f} (first vs last quarter); "
                f"checkpoint {checkpoint}" + (f"; plot {plot}" if plot else ""))
