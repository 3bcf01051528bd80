"""Evaluate checkpoints on a task at several thinking budgets (accuracy vs tokens, with voting).

    python -m elastic_decode.eval --model runs/sft/checkpoint-60 --model runs/grpo/checkpoint-30 \\
        --task arithmetic:3:+ --think-budgets 0,16,32,64,none --solution-budget 32 -n 4

For every checkpoint and every thinking budget t, each problem is answered n times (the samples
share the prompt's KV) with the Elastic Reasoning budget: at most t thinking tokens (the marker
is forced there), then at most --solution-budget solution tokens; `none` lets the model think
until it closes its thought itself (only the context window bounds it). Reported per
(checkpoint, budget): accuracy (mean over all samples), majority-vote accuracy (self-consistency
over the n samples of a problem), pass@n, mean thinking / solution / total tokens, forced-end,
boxed and truncation rates, and tokens per problem (everything generated for it). With
--early-stop none,deepconf,deer every cell also runs under each early exit (docs/confidence.md): DeepConf
stops low-confidence traces and votes weighted by confidence; DEER ends thinking where a probe answer
is confident; tokens per problem then counts stopped traces, cut tokens and probes too. Written to OUTPUT_DIR: results.jsonl, results.csv,
accuracy_vs_tokens.png (one curve per checkpoint, the shape of the paper's budget figures) and,
with --save-completions, every completion. Errors in the input are one line (exit status 2).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cli import (OneLineErrorParser, add_early_stop_arguments, add_engine_arguments, early_stop_params, engine_kwargs,
                  parse_budget, warn_idle_deepconf)
from .errors import ElasticDecodeError
from .utils.answers import confidence_vote, majority_vote
from .utils.outpaths import check_output_dir

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
PLOT_FILE = "accuracy_vs_tokens.png"
COMPLETIONS_FILE = "completions.jsonl"


@dataclass(frozen=True)
class BudgetResult:
    """One row of the table: a checkpoint at one thinking budget."""

    model: str  # the label of the checkpoint
    think_budget: str  # the budget as given ("none" = until the model closes its thinking)
    early_stop: str  # none, deepconf or deer
    problems: int
    samples: int  # completions per problem
    accuracy: float  # mean over all completions
    vote_accuracy: float  # fraction of problems whose majority answer is correct
    pass_at_n: float  # fraction of problems with at least one correct completion
    think_tokens: float  # means per completion
    solution_tokens: float
    total_tokens: float  # everything generated: thinking + marker + solution
    forced_end_rate: float
    boxed_rate: float  # completions with a \boxed{} answer after the marker
    truncated_rate: float  # completions cut by the solution budget (or the context)
    tokens_per_problem: float  # every token generated for a problem: all its traces, cut ones, probes
    early_exit_rate: float  # completions that exited early (stopped, or thinking ended by confidence)
    seconds: float
    tokens_per_s: float


def parse_budgets(text: str) -> list[int | None]:
    budgets = [parse_budget(part.strip()) for part in text.split(",")]
    if len(set(budgets)) != len(budgets):
        raise argparse.ArgumentTypeError(f"a budget appears twice in {text!r}")
    return budgets


EARLY_STOPS = ("none", "deepconf", "deer")


def parse_early_stops(text: str) -> list[str]:
    stops = [part.strip() for part in text.split(",")]
    for s in stops:
        if s not in EARLY_STOPS:
            raise argparse.ArgumentTypeError(f"{s!r} is not an early stop; choose from {', '.join(EARLY_STOPS)}")
    if len(set(stops)) != len(stops):
        raise argparse.ArgumentTypeError(f"an early stop appears twice in {text!r}")
    return stops


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m elastic_decode.eval", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("what to evaluate")
    w.add_argument("--model", action="append", default=[],
                   help="HF checkpoint directory or .gguf file (repeatable; default: the embedded model)")
    w.add_argument("--label", action="append", default=[],
                   help="a name per --model for the table and the plot (default: the path)")
    w.add_argument("--task", default="arithmetic:1",
                   help='arithmetic[:D[:OPS]], countdown[:N], or a JSONL file of {"prompt"|"messages", "answer"} '
                        "(default arithmetic:1)")
    w.add_argument("--num-problems", type=int, default=50,
                   help="problems to draw (synthetic) or to take from the top of the file (default 50)")
    b = p.add_argument_group("budgets and sampling")
    b.add_argument("--think-budgets", type=parse_budgets, default=parse_budgets("0,32,64,128,none"),
                   help="comma-separated thinking budgets; 'none' = no limit (default 0,32,64,128,none)")
    b.add_argument("--solution-budget", type=int, default=64, help="solution tokens after the marker (default 64)")
    b.add_argument("--max-tokens", type=int, default=None,
                   help="cap on all tokens of a completion, e.g. to bound 'none' for a model that never closes "
                        "its thinking (default: the context window)")
    b.add_argument("-n", type=int, default=4, help="samples per problem, for accuracy and voting (default 4)")
    b.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    b.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    b.add_argument("--seed", type=int, default=0, help="draws the problems and seeds the samples (default 0)")
    e = p.add_argument_group("early exit on confidence (docs/confidence.md)")
    e.add_argument("--early-stop", type=parse_early_stops, default=["none"],
                   help="comma-separated: none, deepconf, deer; each is a row per (checkpoint, budget) "
                        "(default none)")
    add_early_stop_arguments(e)
    o = p.add_argument_group("output and engine")
    o.add_argument("--output-dir", type=Path, default=Path("runs/eval"), help="where the table and plot go")
    o.add_argument("--save-completions", action="store_true", help=f"also write every completion to {COMPLETIONS_FILE}")
    add_engine_arguments(o)
    o.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache size (default: the engine's)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def eval_examples(task, count: int, seed: int) -> list:
    """A fixed problem set: the file's first `count` rows, or `count` seeded synthetic draws."""
    from .train.tasks import JsonlTask

    if isinstance(task, JsonlTask):
        return task.examples[:count]
    return task.sample(random.Random(f"eval-{seed}"), count)


def evaluate_budget(llm, task, examples, label: str, budget: int | None, args,
                    early_stop: str = "none") -> tuple[BudgetResult, list[dict]]:
    """Run one (checkpoint, budget, early stop) cell; returns its row and the scored completions. Under deepconf
    the vote is DeepConf's (weighted by lowest group confidence, over the top --deepconf-keep of the traces that
    were not stopped); else the majority vote."""
    from .sampling_params import SamplingParams

    # "none": the budget is the whole context, so only the model's own marker ends thinking.
    think_budget = llm.engine.max_model_len if budget is None else budget
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            think_budget=think_budget, solution_budget=args.solution_budget,
                            max_tokens=args.max_tokens, **early_stop_params(early_stop, args))
    start = time.perf_counter()
    outputs = llm.chat([list(ex.messages) for ex in examples], params, use_tqdm=not args.no_progress)
    seconds = time.perf_counter() - start
    records, correct_votes, any_correct, spent = [], 0, 0, 0
    for p, (ex, out) in enumerate(zip(examples, outputs)):
        scores = [task.score(c.solution_text, ex, 0.0) for c in out.outputs]
        spent += out.tokens_spent
        if early_stop == "deepconf":
            vote = confidence_vote([s.answer for s in scores],
                                   [c.lowest_group_confidence if c.early_exit not in ("low_confidence", "consensus")
                                    else None for c in out.outputs], args.deepconf_keep)
        else:
            vote = majority_vote([s.answer for s in scores])
        vote_correct = vote.index is not None and scores[vote.index].correct
        correct_votes += vote_correct
        any_correct += any(s.correct for s in scores)
        for c, s in zip(out.outputs, scores):
            records.append({"model": label, "think_budget": _name(budget), "early_stop": early_stop,
                            "problem": p, "sample": c.index, "early_exit": c.early_exit, "exit_index": c.exit_index,
                            "lowest_group_confidence": c.lowest_group_confidence, "probes": c.probes,
                            "answer": s.answer, "gold": ex.answer, "correct": s.correct, "vote": vote.answer,
                            "vote_correct": vote_correct, "think_tokens": c.think_tokens,
                            "solution_tokens": c.solution_tokens, "total_tokens": len(c.token_ids),
                            "forced_end": c.forced_end, "finish_reason": c.finish_reason,
                            "thinking_text": c.thinking_text, "solution_text": c.solution_text})
    k = len(records)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in records) / k

    tokens = sum(r["total_tokens"] for r in records)
    result = BudgetResult(
        model=label, think_budget=_name(budget), early_stop=early_stop, problems=len(examples), samples=args.n,
        accuracy=mean("correct"), vote_accuracy=correct_votes / len(examples), pass_at_n=any_correct / len(examples),
        think_tokens=mean("think_tokens"), solution_tokens=mean("solution_tokens"), total_tokens=mean("total_tokens"),
        forced_end_rate=mean("forced_end"), boxed_rate=sum(r["answer"] is not None for r in records) / k,
        truncated_rate=sum(r["finish_reason"] == "length" for r in records) / k,
        tokens_per_problem=spent / len(examples), early_exit_rate=sum(r["early_exit"] is not None for r in records) / k,
        seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
    )
    return result, records


def _name(budget: int | None) -> str:
    return "none" if budget is None else str(budget)


def table(results: list[BudgetResult]) -> str:
    head = (f"{'model':<24} {'budget':>6} {'early':>8} {'acc':>6} {'vote':>6} {'pass@n':>6} {'think':>7} {'sol':>6} "
            f"{'total':>7} {'forced':>6} {'tok/prob':>8} {'exits':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.model[-24:]:<24} {r.think_budget:>6} {r.early_stop:>8} {r.accuracy:>6.3f} "
                     f"{r.vote_accuracy:>6.3f} {r.pass_at_n:>6.3f} {r.think_tokens:>7.1f} {r.solution_tokens:>6.1f} "
                     f"{r.total_tokens:>7.1f} {r.forced_end_rate:>6.2f} {r.tokens_per_problem:>8.1f} "
                     f"{r.early_exit_rate:>5.2f}")
    return "\n".join(lines)


def plot(results: list[BudgetResult], path: Path, title: str) -> Path | None:
    """Accuracy (solid) and vote accuracy (dashed) against tokens per problem, a curve per (model, early stop)."""
    from .train.plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cell = 0.02 * max(r.tokens_per_problem for r in results) or 1.0  # points closer than this share a label
    curves = dict.fromkeys((r.model, r.early_stop) for r in results)
    for i, (model, early) in enumerate(curves):
        rows = sorted((r for r in results if (r.model, r.early_stop) == (model, early)),
                      key=lambda r: r.tokens_per_problem)
        label = model if early == "none" else f"{model}, {early}"
        x = [r.tokens_per_problem for r in rows]
        color = f"C{i}"
        ax.plot(x, [r.accuracy for r in rows], "o-", color=color, label=f"{label}")
        ax.plot(x, [r.vote_accuracy for r in rows], "s--", color=color, alpha=0.6, label=f"{label} (vote)")
        # Budgets whose points (nearly) coincide share one label.
        points: dict[tuple[int, float], list[BudgetResult]] = {}
        for r in rows:
            points.setdefault((round(r.tokens_per_problem / cell), round(r.accuracy, 2)), []).append(r)
        for group in points.values():
            ax.annotate("t=" + ",".join(r.think_budget for r in group), (group[0].tokens_per_problem, group[0].accuracy),
                        textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xlabel("tokens generated per problem (mean: every trace, cut tokens and probes)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return save(plt, fig, path)


def write_results(results: list[BudgetResult], out_dir: Path) -> None:
    rows = [asdict(r) for r in results]
    (out_dir / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(out_dir / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class Plan:
    """What a run evaluates, checked before any model loads."""

    models: list[str | None]
    labels: list[str]
    task: object
    examples: list


def plan(args) -> Plan:
    """Every argument checked (ElasticDecodeError, one line) and the problems drawn, before any model loads."""
    models = args.model or [None]
    if args.label and len(args.label) != len(models):
        raise ElasticDecodeError(f"{len(args.label)} --label for {len(models)} --model")
    labels = args.label or [m or "embedded" for m in models]
    if len(set(labels)) != len(labels):
        raise ElasticDecodeError("two checkpoints share a label: give each --model its own --label")
    for flag, value, least in (("--num-problems", args.num_problems, 1), ("-n", args.n, 1),
                               ("--num-scheduler-steps", args.num_scheduler_steps, 1),
                               ("--solution-budget", args.solution_budget, 1),
                               ("--confidence-window", args.confidence_window, 1),
                               ("--deepconf-warmup", args.deepconf_warmup, 1)):
        if value < least:
            raise ElasticDecodeError(f"{flag} must be >= {least}, got {value}")
    if args.cuda_graphs:
        from .engine.startup import pick_device

        if pick_device(args.device).type != "cuda":
            raise ElasticDecodeError("--cuda-graphs needs a CUDA device")
    from .models.loader import resolve_checkpoint
    from .sampling_params import SamplingParams
    from .train.tasks import make_task

    try:  # range checks, before any model loads
        for early in args.early_stop:
            SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens,
                           think_budget=0, **early_stop_params(early, args))
    except ValueError as e:
        raise ElasticDecodeError(str(e)) from None
    for m in models:
        resolve_checkpoint(m)  # a bad path fails before any work
    try:
        task = make_task(args.task)
    except ValueError as e:
        raise ElasticDecodeError(str(e)) from None
    check_output_dir(args.output_dir, "--output-dir")
    warn_idle_deepconf(args.early_stop, args.n, args.deepconf_warmup)
    return Plan(models, labels, task, eval_examples(task, args.num_problems, args.seed))


def run_cells(run: Plan, args, results: list[BudgetResult]) -> None:
    """Every (checkpoint, budget) cell, appended to `results` and written as it finishes (an interrupt keeps
    the finished rows)."""
    from tqdm.auto import tqdm

    from .llm import LLM

    completions = open(args.output_dir / COMPLETIONS_FILE, "w") if args.save_completions else None
    bar = tqdm(total=len(run.models) * len(args.think_budgets) * len(args.early_stop), desc="eval", unit="cell",
               disable=args.no_progress)
    try:
        for model, label in zip(run.models, run.labels):
            llm = LLM(model, seed=args.seed, kv_cache_memory_gb=args.kv_cache_memory_gb,
                      data_parallel_size=args.data_parallel_size, **engine_kwargs(args))
            for budget in args.think_budgets:
                for early in args.early_stop:
                    bar.set_postfix(model=label[-20:], budget=_name(budget), early_stop=early)
                    result, records = evaluate_budget(llm, run.task, run.examples, label, budget, args, early)
                    results.append(result)
                    write_results(results, args.output_dir)
                    if completions is not None:
                        completions.writelines(json.dumps(r) + "\n" for r in records)
                    bar.update(1)
            del llm
            gc.collect()
    finally:
        bar.close()
        if completions is not None:
            completions.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = plan(args)
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results: list[BudgetResult] = []
    try:
        run_cells(run, args, results)
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {len(results)} finished rows are in {args.output_dir / RESULTS_JSONL}", file=sys.stderr)
        return 130
    title = f"{run.task.name}: {len(run.examples)} problems x {args.n} samples"
    figure = plot(results, args.output_dir / PLOT_FILE, title)
    print(table(results))
    seconds = time.perf_counter() - start
    tokens = sum(r.tokens_per_problem * r.problems for r in results)
    print(f"{len(results)} rows ({len(run.models)} checkpoints x {len(args.think_budgets)} budgets x "
          f"{len(args.early_stop)} early stops, {len(run.examples)} "
          f"problems x {args.n} samples): {tokens:.0f} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s); "
          f"wrote {args.output_dir / RESULTS_JSONL}, {RESULTS_CSV}" + (f", {PLOT_FILE}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
