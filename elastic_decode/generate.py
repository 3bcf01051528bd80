"""Offline budgeted generation from the command line.

    python -m elastic_decode.generate --prompt "What is 17 * 23?"
    python -m elastic_decode.generate --prompts-file in.jsonl --output out.jsonl -n 4 --think-budget 256

Each completion thinks for at most --think-budget tokens; if it has not closed its thinking
by then, the end-of-thinking marker is forced and it writes its solution in at most
--solution-budget tokens. Errors in the input are reported as one line (exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .cli import (OneLineErrorParser, add_early_stop_arguments, add_engine_arguments, early_stop_params, engine_kwargs,
                  parse_budget, warn_idle_deepconf)
from .config import BUDGET_MODES
from .errors import ElasticDecodeError
from .sampling_params import SamplingParams
from .utils.jsonl import check_messages, read_jsonl
from .utils.outpaths import check_output_file

# Shown when the CLI is run with a prompt and nothing else: small enough for the embedded
# 135M model to hit the budget, so the forced marker is visible.
DEFAULT_THINK_BUDGET = 48
DEFAULT_SOLUTION_BUDGET = 96


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m elastic_decode.generate",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input and output")
    src.add_argument("--model", default=None,
                     help="HF checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    src.add_argument("--prompts-file", type=Path,
                     help='JSONL file, one object per line with "prompt" (text) or "messages" (chat)')
    src.add_argument("--output", type=Path,
                     help="write one JSONL row per prompt with all its completions (default: print them)")
    src.add_argument("--no-chat-template", action="store_true",
                     help="send text prompts as raw text instead of through the chat template")
    b = p.add_argument_group("budgets (Elastic Reasoning)")
    b.add_argument("--think-budget", type=parse_budget, default=DEFAULT_THINK_BUDGET,
                   help=f"thinking tokens before the marker is forced; 'none' = plain decoding "
                        f"(default {DEFAULT_THINK_BUDGET})")
    b.add_argument("--solution-budget", type=parse_budget, default=DEFAULT_SOLUTION_BUDGET,
                   help=f"solution tokens after the marker; 'none' = until EOS (default {DEFAULT_SOLUTION_BUDGET})")
    b.add_argument("--end-think", default=None,
                   help="end-of-thinking marker text (default: the model's </think>, else '\\n</think>\\n\\n')")
    b.add_argument("--budget-mode", choices=BUDGET_MODES, default="in-kernel",
                   help="in-kernel: the sampler forces the marker on the device (default); two-call: the "
                        "reference recipe (think, append the marker, prefill again, solve), for comparison")
    b.add_argument("--min-think", type=parse_budget, default=0,
                   help="the model may not close its thinking before this many tokens (default 0)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1] (default 0.95)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--max-tokens", type=parse_budget, default=None, help="cap on all generated tokens")
    s.add_argument("-n", type=int, default=1, help="completions per prompt (they share the prompt's KV)")
    s.add_argument("--seed", type=int, default=None, help="RNG seed (same seed, same tokens)")
    s.add_argument("--vote", action="store_true",
                   help="majority vote (self-consistency) over the n completions' \\boxed{} answers; "
                        "needs -n 2 or more (under --early-stop deepconf: DeepConf's confidence-weighted vote)")
    x = p.add_argument_group("early exit on confidence (docs/confidence.md)")
    x.add_argument("--early-stop", choices=("none", "deepconf", "deer"), default="none",
                   help="deepconf: traces whose group confidence falls below the warm-up's threshold stop; deer: "
                        "thinking ends where a probe answer is confident (needs --think-budget); default none")
    add_early_stop_arguments(x)
    e = p.add_argument_group("engine")
    add_engine_arguments(e, backend=True)
    e.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    return p


def read_prompts(args) -> list[dict]:
    """Every prompt as {"prompt": str} or {"messages": [...]}, validated before the model loads."""
    rows = [{"prompt": text} for text in args.prompt]
    if args.prompts_file is not None:
        file_rows = read_jsonl(args.prompts_file, "--prompts-file")
        if not file_rows:
            raise ElasticDecodeError(f"--prompts-file {args.prompts_file} holds no prompts")
        for where, row in file_rows:
            fields = {"prompt", "messages"} & row.keys()
            if not fields:
                raise ElasticDecodeError(f'{where}: needs a "prompt" or "messages" field')
            if len(fields) == 2:
                raise ElasticDecodeError(f'{where}: give "prompt" or "messages", not both')
            check_messages(row, where)
            if "prompt" in row and not isinstance(row["prompt"], str):
                raise ElasticDecodeError(f'{where}: "prompt" must be a string')
            rows.append(row)
    if not rows:
        raise ElasticDecodeError("no prompts: give --prompt TEXT or --prompts-file FILE")
    for i, row in enumerate(rows):
        if "messages" not in row and not row["prompt"].strip():
            raise ElasticDecodeError(f"prompt {i} is empty")
    return rows


def vote_of(out, early_stop: str, keep: float):
    """The vote --vote prints: DeepConf's under deepconf (weighted by lowest group confidence, the top `keep`
    share of the traces it did not stop), else the majority."""
    if early_stop != "deepconf":
        return out.vote()
    from .utils.answers import confidence_vote, extract_boxed

    answers = [extract_boxed(c.solution_text) for c in out.outputs]
    scores = [c.lowest_group_confidence if c.early_exit not in ("low_confidence", "consensus") else None
              for c in out.outputs]
    return confidence_vote(answers, scores, keep)


def _record(row: dict, index: int, out, vote) -> dict:
    """An --output row: the input row (prompt or messages, and any extra fields), its index, the results."""
    result = out.to_dict()
    record = {**row, "index": index, "prompt_token_ids": result["prompt_token_ids"], "completions": result["outputs"]}
    if vote:
        record["vote"] = dataclasses.asdict(vote(out))
    return record


def _vote_line(vote, weighted: bool = False) -> str:
    kind = "confidence-weighted vote" if weighted else "majority vote"
    if vote.answer is None:
        return f"[{kind}: no answer in any of the {vote.total} completions]"
    tie = ", a tie broken by the earliest answer" if vote.tie else ""
    weight = f", {vote.weight_share:.0%} of the weight" if weighted else ""
    return (f"[{kind}: {vote.answer} with {vote.votes} of {vote.total} completions "
            f"({vote.answered} answered{tie}{weight})]")


def _show(index: int, total: int, row: dict, out, decode, think_budget: int | None) -> None:
    label = row.get("prompt") or row["messages"][-1].get("content", "")
    print(f"=== prompt {index + 1}/{total}: {label}")
    for c in out.outputs:
        if len(out.outputs) > 1:
            print(f"--- completion {c.index + 1}/{len(out.outputs)}")
        if think_budget is not None:
            print(f"[thinking: {c.think_tokens} tokens]")
            print(c.thinking_text.strip())
            marker = decode(c.token_ids[c.think_tokens : len(c.token_ids) - c.solution_tokens])
            if not c.forced_end and not c.solution_tokens and marker == "":
                print("[still thinking when the completion ended]")
            elif not c.forced_end:
                print(f"[end of thinking: closed by the model] {marker!r}")
            elif c.think_tokens >= think_budget:
                print(f"[end of thinking forced: budget spent] {marker!r}")
            else:
                print(f"[end of thinking forced: the model tried to stop] {marker!r}")
        if c.early_exit is not None:
            print(f"[early exit: {c.early_exit} at token {c.exit_index}" + (f", {c.probes} probes" if c.probes else "")
                  + (f", lowest group confidence {c.lowest_group_confidence:.3f}]"
                     if c.lowest_group_confidence is not None else "]"))
        print(f"[solution: {c.solution_tokens} tokens, finish: {c.finish_reason}]")
        print(c.solution_text.strip())
    print()


def sampling_params(args) -> SamplingParams:
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          seed=args.seed, max_tokens=args.max_tokens, think_budget=args.think_budget,
                          solution_budget=args.solution_budget, end_think=args.end_think, min_think=args.min_think,
                          **early_stop_params(args.early_stop, args))


def encode(llm, rows: list[dict], chat_template: bool) -> list[list[int]]:
    """Each row's prompt ids: a conversation or a text prompt through the chat template, or raw text."""
    if not chat_template:
        return [llm.encode_chat(row["messages"]) if "messages" in row else llm.encode(row["prompt"]) for row in rows]
    return [llm.encode_chat(row.get("messages") or [{"role": "user", "content": row["prompt"]}]) for row in rows]


class RowSink:
    """--output: each prompt's row written (and flushed) as soon as its completions finish, so an interrupt
    or a late error keeps every finished row; a finished run is rewritten in prompt order."""

    def __init__(self, path, rows: list[dict], vote):
        self.path, self.rows, self.vote = path, rows, vote
        self.written: list[dict] = []
        self.file = open(path, "w")

    def __call__(self, index: int, out) -> None:
        record = _record(self.rows[index], index, out, self.vote)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.written.append(record)

    def close_partial(self) -> None:
        self.file.close()
        print(f"wrote the {len(self.written)} of {len(self.rows)} rows that finished to {self.path} "
              "(each with its prompt's \"index\")", file=sys.stderr)

    def close_in_order(self) -> None:
        self.file.close()
        ordered = sorted(self.written, key=lambda r: r["index"])
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        os.replace(tmp, self.path)
        print(f"wrote {len(ordered)} rows to {self.path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # everything a user can get wrong, before and while the model loads
        params = sampling_params(args)
        if args.vote and args.n < 2:
            raise ElasticDecodeError("--vote needs -n 2 or more (a vote over one completion is that completion)")
        rows = read_prompts(args)
        warn_idle_deepconf([args.early_stop], args.n, args.deepconf_warmup)
        if args.output is not None:
            check_output_file(args.output, "--output")
        from .llm import LLM

        llm = LLM(args.model, budget_mode=args.budget_mode, data_parallel_size=args.data_parallel_size,
                  **engine_kwargs(args, max_model_len=args.max_model_len))
        encoded = encode(llm, rows, chat_template=not args.no_chat_template)
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    vote = (lambda out: vote_of(out, args.early_stop, args.deepconf_keep)) if args.vote else None
    sink = RowSink(args.output, rows, vote) if args.output is not None else None
    try:
        outputs = llm.generate(encoded, params, use_tqdm=len(rows) > 1, on_finished=sink)
    except (ElasticDecodeError, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print("interrupted" if interrupted else f"error: {e}", file=sys.stderr)
        if sink is not None:
            sink.close_partial()
        return 130 if interrupted else 2
    if sink is not None:
        sink.close_in_order()
    else:
        for i, (row, out) in enumerate(zip(rows, outputs)):
            _show(i, len(rows), row, out, llm.engine.tokenizer.decode, args.think_budget)
            if args.vote:
                print(_vote_line(vote(out), weighted=args.early_stop == "deepconf"))
                print()
    spent = sum(out.tokens_spent for out in outputs)
    print(llm.last_stats.summary() + (f"; {spent} tokens spent in all (cut ones and probes included)"
                                      if args.early_stop != "none" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
