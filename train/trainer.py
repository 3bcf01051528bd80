"""The GRPO loop: rollouts through the engine -> rewards -> advantages -> clipped objective -> step
-> weights copied into the engine in place.

One rollout batch per step: `prompts_per_step` prompts, `group_size` completions each, decoded
by the engine with the Elastic Reasoning budget (think up to t*, the marker forced, solve up to
s*) in one pass. The trainable model is a transformers model (fp32 master weights; bf16 autocast
on CUDA) that recomputes the completions' logprobs with gradient. Only the engine's public API
is used: `generate_tensors`, `encode_chat`, `load_weights`, `load_weights_in_flight`.

With `async_rollouts` the rollouts come from a producer thread (async_rollouts.py) that runs up to
`max_staleness` steps ahead; the weights go to the engine in flight, named by the step that made them,
so every token knows its policy's step, and the loss may weight tokens by their importance ratio
against the engine's sampling logprobs (loss.py: importance_weights).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from elastic_decode import LLM, SamplingParams
from elastic_decode.models.loader import resolve_checkpoint

from .async_rollouts import RolloutProducer
from .config import GRPOConfig
from .data_parallel import DataParallel
from .loss import grpo_loss, group_advantages, importance_weights, loss_mask, token_entropy, token_logprobs
from .report import Reporter, check_installed, parse_targets
from .tasks import make_task

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
# On a GPU the rollout engine's KV cache takes this share of the memory left after the policy
# (and reference) are loaded, unless kv_cache_memory_gb says otherwise.
KV_SHARE_OF_FREE_GPU_MEMORY = 0.3


@dataclass
class Rollout:
    """One step's completions, their scores and which rows train."""

    prompt_ids: list[list[int]]  # [rows] each row's prompt
    completion_ids: torch.Tensor  # int64 [rows, T]
    completion_mask: torch.Tensor  # int32 [rows, T]
    engine_logprobs: torch.Tensor  # float32 [rows, T] (what the sampler saw)
    loss_mask: torch.Tensor  # float32 [rows, T]
    rewards: torch.Tensor  # float32 [rows]
    advantages: torch.Tensor  # float32 [rows]
    token_steps: torch.Tensor  # int64 [rows, T]: the optimizer step whose weights sampled each token
    think_budgets: torch.Tensor  # int64 [rows]: each row's thinking budget (--think-budget-schedule)
    think_tokens: torch.Tensor  # int64 [rows]: what each row thought
    sums: dict[str, float]  # this rank's sums of the rollout metrics (reduced over ranks by the trainer)
    seconds: float  # the whole rollout (generation and scoring)
    engine_seconds: float  # the engine's generate call


def sequence_logprobs(
    model,
    prompt_ids: list[list[int]],  # [B] token ids of each row's prompt
    completion_ids: torch.Tensor,  # int64 [B, T]
    completion_mask: torch.Tensor,  # {0,1} [B, T]
    pad_id: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # float32 [B, T], float32 [B, T] or None
    """Logprobs (and entropies) of the completion tokens under `model`, prompts left-padded.

    Left-padding the prompts puts every completion at the same columns, so one slice of the
    logits serves the whole batch; positions come from the attention mask, so padding does not
    shift RoPE.
    """
    device = completion_ids.device
    width = max(len(p) for p in prompt_ids)
    rows, length = completion_ids.shape
    prompts = torch.full((rows, width), pad_id, dtype=torch.long, device=device)  # [B, P]
    prompt_mask = torch.zeros(rows, width, dtype=torch.long, device=device)
    for r, ids in enumerate(prompt_ids):
        prompts[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long, device=device)
        prompt_mask[r, width - len(ids):] = 1
    input_ids = torch.cat([prompts, completion_ids], dim=1)  # [B, P + T]
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=length + 1,
    )
    logits = out.logits[:, :-1]  # [B, T, V]: position P - 1 + i predicts completion token i
    logprobs = token_logprobs(logits, completion_ids, temperature)
    entropy = None
    if with_entropy:
        entropy = token_entropy(logits, temperature)
    return logprobs, entropy


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(the engine's dtype, the training forward's autocast dtype or None) for a `dtype` setting.

    Master weights stay fp32 (AdamW on bf16 weights loses small updates); "auto" means bf16 on
    a GPU and fp32 on CPU; a 16-bit setting autocasts the forward wherever it runs.
    """
    engine_dtype = dtype if dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return engine_dtype, (getattr(torch, engine_dtype) if engine_dtype != "float32" else None)


def load_hf_model(path: Path, device: torch.device, trainable: bool, gradient_checkpointing: bool):
    """A transformers model in fp32 (the master weights), ready to train or frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if trainable:
        if gradient_checkpointing:
            # transformers 5.2x renamed it; the GPU machines' 5.17 has only the old name.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model


def write_checkpoint(output_dir: Path, step: int, model, tokenizer, config: GRPOConfig, state: dict | None) -> Path:
    """`output_dir/checkpoint-STEP` in HF format (written to a temp dir, then renamed), with the
    run's config and, when given, the trainer state needed to resume."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    (tmp / "grpo_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _rollout_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**31 - 1)


class GRPOTrainer:
    """`GRPOTrainer(config).train()`; `resume_from` continues a run from one of its checkpoints."""

    def __init__(self, config: GRPOConfig, *, resume_from: str | Path | None = None, overwrite: bool = False,
                 use_tqdm: bool = True):
        self.config = config
        self.use_tqdm = use_tqdm
        self.task = make_task(config.task)
        self.report_targets = parse_targets(config.report_to)
        check_installed(self.report_targets)  # before any model loads
        self.output_dir = Path(config.output_dir)
        metrics_path = self.output_dir / METRICS_FILE
        if resume_from is None and metrics_path.exists() and not overwrite:
            raise ValueError(
                f"{self.output_dir} already holds a run ({METRICS_FILE}); resume it with --resume "
                "CHECKPOINT, pick another --output-dir, or pass --overwrite"
            )
        self.base_path = resolve_checkpoint(config.model)
        start_path = Path(resume_from) if resume_from is not None else self.base_path
        state = None
        if resume_from is not None:
            if not (start_path / STATE_FILE).is_file():
                raise ValueError(f"{start_path} is not a checkpoint of this trainer (no {STATE_FILE})")
            state = torch.load(start_path / STATE_FILE, map_location="cpu", weights_only=False)

        torch.manual_seed(config.seed)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dp = DataParallel.from_env(self.device.type)  # under torchrun: this rank's share of each step
        if self.dp is not None:
            self.device = DataParallel.local_device(self.device)
            if config.prompts_per_step < self.dp.size:
                raise ValueError(f"prompts_per_step ({config.prompts_per_step}) must be at least the number of "
                                 f"ranks ({self.dp.size}): each rank rolls out whole prompts")
        self.is_main = self.dp is None or self.dp.is_main
        if config.cuda_graphs and self.device.type != "cuda":  # before any model loads
            raise ValueError(f"cuda_graphs needs a CUDA device; the trainer runs on {self.device}")
        engine_dtype, self.autocast_dtype = resolve_dtypes(config.dtype, self.device)
        self.policy = load_hf_model(start_path, self.device, trainable=True,
                                    gradient_checkpointing=config.gradient_checkpointing)
        self.reference = (load_hf_model(self.base_path, self.device, trainable=False, gradient_checkpointing=False)
                          if config.kl_coef > 0 else None)
        kv_gb = config.kv_cache_memory_gb
        if kv_gb is None and self.device.type == "cuda":
            # The engine alone would take 90% of free memory; the backward pass needs most of it.
            kv_gb = KV_SHARE_OF_FREE_GPU_MEMORY * torch.cuda.mem_get_info(self.device)[0] / 2**30
        self.engine = LLM(
            model=str(start_path),
            dtype=engine_dtype,
            device=str(self.device),
            seed=config.seed,
            max_num_seqs=config.prompts_per_step * config.group_size,
            kv_cache_memory_gb=kv_gb,
            num_scheduler_steps=config.num_scheduler_steps,
            cuda_graphs=config.cuda_graphs,
            tensor_parallel_size=config.tensor_parallel_size,
        )
        # Left padding of prompts is masked out, so any valid id serves.
        self.pad_id = 0
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.step = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            torch.set_rng_state(state["torch_rng"])
            if self.is_main:
                _truncate_metrics(metrics_path, self.step)
        elif metrics_path.exists() and self.is_main:
            metrics_path.unlink()  # --overwrite
        self.first_step = self.step  # the step of the engine's first weights (token_steps)
        self.producer: RolloutProducer | None = None
        self.reporter: Reporter | None = None

    # -- one step ------------------------------------------------------------------------

    def rollout(self, step: int) -> Rollout:
        """One step's rollouts and rewards. No collective runs here (the async producer calls it on its own
        thread): `rollout_metrics` reduces the sums over ranks."""
        cfg = self.config
        start = time.perf_counter()
        rng = random.Random(f"{cfg.seed}-{step}")
        examples = self.task.sample(rng, cfg.prompts_per_step)
        budgets = cfg.budget_schedule.budgets(step, cfg.steps, len(examples), cfg.think_budget,
                                              random.Random(f"{cfg.seed}-{step}-budgets"))
        if self.dp is not None:
            examples, budgets = self.dp.share(examples), self.dp.share(budgets)
        prompt_ids = [self.engine.encode_chat(list(ex.messages)) for ex in examples]
        params = [SamplingParams(
            n=cfg.group_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            think_budget=budget,
            solution_budget=cfg.solution_budget,
            seed=_rollout_seed(cfg.seed, step),
        ) for budget in budgets]
        batch = self.engine.generate_tensors(prompt_ids, params)
        scores = [
            self.task.score(text, examples[int(i)], cfg.format_reward_weight)
            for text, i in zip(batch.solution_texts, batch.prompt_index)
        ]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.group_size, cfg.advantage_scaling)
        mask = loss_mask(batch.completion_mask, batch.forced_mask, batch.truncated,
                         cfg.mask_forced_tokens, cfg.mask_truncated)
        think_budgets = torch.tensor(budgets, dtype=torch.long)[batch.prompt_index]
        stats = self.engine.last_stats
        # Sums over this rank's rows (over all ranks' once rollout_metrics reduces them), then means.
        sums = {
            "reward_mean": rewards.sum().item(),
            "reward_sq": (rewards**2).sum().item(),
            "accuracy": float(sum(s.correct for s in scores)),
            "format_rate": float(sum(s.formatted for s in scores)),
            "think_tokens": batch.think_tokens.float().sum().item(),
            "solution_tokens": batch.solution_tokens.float().sum().item(),
            "forced_tokens": batch.forced_mask.sum().float().item(),
            "forced_end_rate": batch.forced_end.float().sum().item(),
            "truncated_rate": batch.truncated.float().sum().item(),
            "think_budget": think_budgets.float().sum().item(),
            "rows": float(len(scores)),
            "rollout_tokens": float(stats.output_tokens),
        }
        return Rollout(
            prompt_ids=batch.prompt_ids,
            completion_ids=batch.completion_ids,
            completion_mask=batch.completion_mask,
            engine_logprobs=batch.logprobs,
            loss_mask=mask,
            rewards=rewards,
            advantages=advantages,
            token_steps=self._token_steps(batch.weight_versions, batch.completion_ids.shape[1]),
            think_budgets=think_budgets,
            think_tokens=batch.think_tokens,
            sums=sums,
            seconds=time.perf_counter() - start,
            engine_seconds=stats.seconds,
        )

    def _token_steps(self, versions: list[list[tuple[int, str]]], width: int) -> torch.Tensor:
        """int64 [rows, width]: the optimizer step of each token's weights, from the engine's versions (the
        trainer names each update by its step; the engine's first weights, "0", are this run's start)."""
        out = torch.full((len(versions), width), self.first_step, dtype=torch.long)
        for r, runs in enumerate(versions):
            for k, (start, version) in enumerate(runs):
                end = runs[k + 1][0] if k + 1 < len(runs) else width
                out[r, start:end] = self.first_step if version == "0" else int(version)
        return out

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """The rollout's metrics, means over every rank's rows (the collectives run on the trainer's thread)."""
        sums, seconds = dict(rollout.sums), rollout.engine_seconds
        if self.dp is not None:
            sums = dict(zip(sums, self.dp.sum(list(sums.values()))))
            seconds = self.dp.max(seconds)
        rows = sums.pop("rows")
        sq = sums.pop("reward_sq")
        metrics = {name: value / rows for name, value in sums.items() if name != "rollout_tokens"}
        variance = (sq - rows * metrics["reward_mean"] ** 2) / max(rows - 1, 1)  # unbiased, as torch.std
        metrics["reward_std"] = max(variance, 0.0) ** 0.5
        metrics["rollout_tokens"] = sums["rollout_tokens"]
        metrics["rollout_tokens_per_s"] = sums["rollout_tokens"] / max(seconds, 1e-9)
        return metrics

    def _logprobs(self, model, rollout: Rollout, rows: slice, with_entropy: bool):
        ids = rollout.completion_ids[rows].to(self.device)
        mask = rollout.completion_mask[rows].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return sequence_logprobs(
                model, rollout.prompt_ids[rows], ids, mask, self.pad_id, self.config.temperature, with_entropy
            )

    def optimize(self, rollout: Rollout, step: int) -> dict[str, float]:
        """num_iterations optimizer steps on one rollout batch (for optimizer step `step`); returns the loss
        metrics. Tokens whose weights are more than max_staleness steps older than the policy trained (the
        weights of step - 1) get no gradient; with the off-policy correction each token's loss is weighted by
        its importance ratio against the engine's sampling logprob."""
        cfg = self.config
        staleness = (step - 1) - rollout.token_steps  # [rows, T]
        real = rollout.loss_mask > 0
        # Past the bound (the producer keeps this from happening) or from weights newer than the policy
        # trained (an update left over from an interrupted step): such a token never trains.
        stale = real & ((staleness > cfg.max_staleness) | (staleness < 0))
        if stale.any():
            rollout.loss_mask = rollout.loss_mask.masked_fill(stale, 0.0)
        seen = staleness[real & ~stale]
        # Counts (summed over ranks below): tokens, staleness sum, dropped, one per staleness 0..K.
        staleness_counts = [float(seen.numel()), float(seen.sum().item()), float(stale.sum().item())] + [
            float((seen == k).sum().item()) for k in range(cfg.max_staleness + 1)]
        staleness_max = float(seen.max().item()) if seen.numel() else 0.0
        num_rows = rollout.completion_ids.shape[0]
        slices = [slice(i, min(i + cfg.micro_batch_size, num_rows)) for i in range(0, num_rows, cfg.micro_batch_size)]
        total_tokens = rollout.loss_mask.sum().item()
        total_rows = num_rows
        if self.dp is not None:  # each rank's loss is its share of the whole step's
            total_tokens, total_rows = self.dp.sum([total_tokens, total_rows])
            total_rows = int(total_rows)
        old = ref = None
        with torch.no_grad():
            if cfg.num_iterations > 1:  # ratios of later iterations are against the rollout policy
                old = [self._logprobs(self.policy, rollout, s, False)[0] for s in slices]
            if self.reference is not None:
                ref = [self._logprobs(self.reference, rollout, s, False)[0] for s in slices]
        sums: dict[str, float] = {}
        gap_sum = gap_tokens = 0.0
        weights: list[torch.Tensor | None] = [None] * len(slices)  # importance weights, per micro-batch
        ratio_max, ratio_min = 0.0, float("inf")
        for iteration in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for k, rows in enumerate(slices):
                logprobs, entropy = self._logprobs(self.policy, rollout, rows, with_entropy=True)
                mask = rollout.loss_mask[rows].to(self.device)
                if iteration == 0:  # how far the engine's logprobs are from the trainer's
                    engine_lp = rollout.engine_logprobs[rows].to(self.device)
                    gap_sum += ((logprobs.detach() - engine_lp).abs() * mask).sum().item()
                    gap_tokens += mask.sum().item()
                if cfg.entropy_coef == 0:
                    entropy = entropy.detach()
                if cfg.corrects_off_policy and iteration == 0:  # against the policy before this step's update
                    before = old[k] if old is not None else logprobs.detach()
                    weights[k], is_metrics = importance_weights(
                        before, rollout.engine_logprobs[rows].to(self.device), mask, cfg.importance_sampling_mode,
                        cfg.importance_sampling_clip_max, cfg.importance_sampling_clip_min)
                    tokens = mask.sum().item()
                    if tokens:
                        ratio_max = max(ratio_max, is_metrics["is_ratio_max"].item())
                        ratio_min = min(ratio_min, is_metrics["is_ratio_min"].item())
                    for name in ("is_ratio_mean", "is_clipped_fraction"):  # token-weighted over the batch
                        sums[name] = sums.get(name, 0.0) + is_metrics[name].item() * tokens * cfg.num_iterations
                loss, metrics = grpo_loss(
                    logprobs,
                    old[k] if old is not None else logprobs.detach(),
                    rollout.advantages[rows].to(self.device),
                    mask,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high,
                    aggregation=cfg.loss_aggregation,
                    ref_logprobs=ref[k] if ref is not None else None,
                    kl_coef=cfg.kl_coef,
                    entropy=entropy,
                    entropy_coef=cfg.entropy_coef,
                    max_completion_length=cfg.max_completion_length,
                    total_tokens=total_tokens,
                    total_rows=total_rows,
                    importance_weights=weights[k],
                )
                loss.backward()
                loss_total += loss.item()
                tokens = metrics.pop("loss_tokens").item()
                for name, value in metrics.items():  # token-weighted means over the batch
                    sums[name] = sums.get(name, 0.0) + value.item() * tokens
            if self.dp is not None:
                self.dp.sum_gradients(self.policy.parameters())
            limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), limit).item()
            self.optimizer.step()
        if self.dp is not None:
            names = sorted(sums)
            totals = self.dp.sum([sums[n] for n in names] + [loss_total, gap_sum, gap_tokens] + staleness_counts)
            sums = dict(zip(names, totals))
            loss_total, gap_sum, gap_tokens = totals[len(names):len(names) + 3]
            staleness_counts = totals[len(names) + 3:]
            staleness_max = self.dp.max(staleness_max)
            if cfg.corrects_off_policy:
                ratio_max, ratio_min = self.dp.max(ratio_max), -self.dp.max(-ratio_min)
        weight = max(total_tokens * cfg.num_iterations, 1.0)
        out = {name: value / weight for name, value in sums.items()}
        out.update(loss=loss_total, grad_norm=grad_norm, loss_tokens=total_tokens,
                   logprob_gap=gap_sum / max(gap_tokens, 1.0))
        if cfg.async_rollouts:  # (always 0 in the synchronous trainer) the mean, max and histogram over ranks
            tokens_seen, staleness_sum, dropped, *per_k = staleness_counts
            out.update(staleness_mean=staleness_sum / max(tokens_seen, 1.0), staleness_max=staleness_max,
                       stale_tokens_dropped=dropped,
                       **{f"staleness_{k}": c / max(tokens_seen, 1.0) for k, c in enumerate(per_k)})
        if cfg.corrects_off_policy:
            out.update(is_ratio_max=ratio_max, is_ratio_min=ratio_min if ratio_min != float("inf") else 0.0)
        return out

    def sync_weights(self, step: int) -> float:
        """Copy the policy's weights into the engine in place, named by `step` (in flight when a producer's
        rollout runs: between two of its decode steps); returns the seconds it took."""
        start = time.perf_counter()
        with torch.no_grad():
            load = self.engine.load_weights_in_flight if self.producer is not None else self.engine.load_weights
            load(self.policy.named_parameters(), version=str(step))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def train_step(self) -> dict[str, float]:
        step = self.step + 1
        t0 = time.perf_counter()
        if self.producer is not None:
            rollout, producer_waited = self.producer.get(step)
        else:
            rollout, producer_waited = self.rollout(step), 0.0
        t1 = time.perf_counter()
        rollout_metrics = self.rollout_metrics(rollout)
        loss_metrics = self.optimize(rollout, step)
        self.step = step  # the policy is step's now (a checkpoint taken from here on says so)
        t2 = time.perf_counter()
        sync = self.sync_weights(step)
        if self.producer is not None:
            self.producer.synced(step)
        row = {"step": step, **rollout_metrics, **loss_metrics,
               "rollout_seconds": rollout.seconds, "train_seconds": t2 - t1, "weight_sync_seconds": sync}
        if self.producer is not None:  # where each side waited for the other
            row.update(rollout_wait_seconds=t1 - t0, producer_wait_seconds=producer_waited)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.reporter is not None:
                self.reporter.log(row, step)
        return row

    # -- the run -------------------------------------------------------------------------

    def train(self) -> Path:
        """Run up to config.steps; returns the final checkpoint's directory."""
        cfg = self.config
        start = time.perf_counter()
        rows = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="grpo", unit="step",
                   disable=not self.use_tqdm or not self.is_main)
        if self.is_main and self.report_targets:
            self.reporter = Reporter(self.report_targets, self.output_dir, cfg.to_dict(), self.step)
        if cfg.async_rollouts and self.step < cfg.steps:
            self.producer = RolloutProducer(self.rollout, self.step + 1, cfg.steps, cfg.max_staleness)
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                rows.append(row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}",
                                think=f"{row['think_tokens']:.0f}")
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self._stop_side_work()
            if self.step:
                path = self.save_checkpoint()
                print(f"interrupted: saved step {self.step} to {path} (continue with --resume {path})")
            raise
        except BaseException:
            self._stop_side_work()
            raise
        bar.close()
        self._stop_side_work(wait=True)
        path = self.save_checkpoint()
        if self.is_main:
            plot = self.write_plot()
            print(self.summary(rows, time.perf_counter() - start, path, plot))
        if self.dp is not None:
            self.dp.close()
        return path

    def _stop_side_work(self, wait: bool = False) -> None:
        """The producer starts no further rollout and, unless `wait` (a finished run: it has made its
        last), the one it is making is cancelled; the reporters are closed."""
        if self.producer is not None:
            if not wait:
                self.producer.stop()
                self.engine.cancel_running()
            self.producer.join(timeout=None if wait else 60)
            self.producer = None
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None

    def save_checkpoint(self) -> Path:
        """HF format (loadable by the engine and transformers) plus the optimizer state."""
        if not self.is_main:  # every rank holds the same weights; rank 0 writes them
            return self.output_dir / f"checkpoint-{self.step}"
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "config": self.config.to_dict()}
        return write_checkpoint(self.output_dir, self.step, self.policy, self.engine.tokenizer, self.config, state)

    def write_plot(self) -> Path | None:
        from .plot import plot_metrics

        return plot_metrics(self.output_dir / METRICS_FILE, self.output_dir / PLOT_FILE)

    @staticmethod
    def summary(rows: list[dict], seconds: float, checkpoint: Path, plot: Path | None) -> str:
        if not rows:
            return f"nothing to do: the run already reached its last step; checkpoint {checkpoint}"
        quarter = max(1, len(rows) // 4)
        head, tail = rows[:quarter], rows[-quarter:]

        def total(key: str) -> float:
            return sum(r[key] for r in rows)

        def change(key: str, digits: int) -> str:
            first, last = (sum(r[key] for r in rs) / len(rs) for rs in (head, tail))
            return f"{first:.{digits}f} -> {last:.{digits}f}"

        overlap = ""
        if all("rollout_wait_seconds" in r for r in rows):  # async: rollouts ran beside training
            overlap = (f"; async, the trainer waited {total('rollout_wait_seconds'):.0f} s for rollouts, "
                       f"staleness at most {max(r['staleness_max'] for r in rows):.0f}")
        return (
            f"{len(rows)} steps in {seconds:.0f} s (rollouts {total('rollout_seconds'):.0f} s, "
            f"{total('rollout_tokens'):.0f} tokens; training {total('train_seconds'):.0f} s; "
            f"weight sync {total('weight_sync_seconds'):.2f} s{overlap}); reward {change('reward_mean', 3)} "
            f"(first vs last quarter), accuracy {change('accuracy', 2)}; checkpoint {checkpoint}"
            + (f"; plot {plot}" if plot else "")
        )


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows of steps after the checkpoint: resuming redoes them."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
