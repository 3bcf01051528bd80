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

from .config import BUDGET_MODES
from .errors import ElasticDecodeError
from .jsonl import check_messages, read_jsonl
from .outpaths import check_output_file

# Shown when the CLI is run with a prompt and nothing else: small enough for the embedded
# 135M model to hit the budget, so the forced marker is visible.
DEFAULT_THINK_BUDGET = 48
DEFAULT_SOLUTION_BUDGET = 96


def parse_budget(text: str) -> int | None:
    """A budget flag's value: a non-negative integer, or 'none' for no budget."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer or 'none', got {text!r}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line for a bad argument (argparse's default also prints the whole usage)."""
        self.exit(2, f"error: {message} (see --help)\n")


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
                        "needs -n 2 or more")
    e = p.add_argument_group("engine")
    add_engine_arguments(e)
    e.add_argument("--backend", default=None, help="auto (Triton on CUDA, the C++ kernels on CPU) | triton | cpu | "
                   "reference")
    e.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    return p


def add_engine_arguments(group) -> None:
    """The engine flags every CLI that builds an LLM shares (generate, eval)."""
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights and KV cache; auto: bfloat16 on a CPU with AVX512-BF16 or AMX, else float32 "
                       "on CPU, the checkpoint's 16-bit dtype on CUDA; float32 is exact parity with HF [auto]")
    group.add_argument("--quantization", default=None, choices=("int4",),
                       help="weight-only quantization: int4 keeps the decoder layers' GEMM weights in 4 bits and "
                            "the LM head's in 8 (groups of 32, GGUF's Q4_1 / Q8_0; the embedded Q4_1 model keeps its "
                            "own weights), activations in float32; CPU backend only; faster at batch 1, slower at "
                            "batch 16 (default: none, the weights in --dtype)")
    group.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    group.add_argument("--num-scheduler-steps", type=int, default=1,
                       help="decode steps run on the device between host syncs; same output for any value (default 1)")
    graphs = group.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", action="store_const", const=True, default=None,
                        help="ask for CUDA graphs of the decode step, an error where they cannot run (default: on "
                             "where they can: CUDA, Triton kernels, one rank; a capture that fails at start-up "
                             "falls back to eager decoding with a warning)")
    graphs.add_argument("--enforce-eager", action="store_true",
                        help="never capture CUDA graphs: decode eagerly")
    group.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="split the model over this many GPUs (or CPU processes), Megatron-style (default 1)")
    group.add_argument("--data-parallel-size", type=int, default=1,
                       help="run this many engine replicas (each --tensor-parallel-size GPUs) and deal the prompts "
                            "among them (default 1)")


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
            if "messages" in row and any(not str(m["content"]).strip() for m in row["messages"]):
                raise ElasticDecodeError(f"{where}: a message has empty content")
            if "prompt" in row and not isinstance(row["prompt"], str):
                raise ElasticDecodeError(f'{where}: "prompt" must be a string')
            rows.append(row)
    if not rows:
        raise ElasticDecodeError("no prompts: give --prompt TEXT or --prompts-file FILE")
    for i, row in enumerate(rows):
        if "messages" not in row and not row["prompt"].strip():
            raise ElasticDecodeError(f"prompt {i} is empty")
    return rows


def _record(row: dict, index: int, out, vote: bool) -> dict:
    """An --output row: the input row (prompt or messages, and any extra fields), its index, the results."""
    result = out.to_dict()
    record = {**row, "index": index, "prompt_token_ids": result["prompt_token_ids"], "completions": result["outputs"]}
    if vote:
        record["vote"] = dataclasses.asdict(out.vote())
    return record


def _vote_line(vote) -> str:
    if vote.answer is None:
        return f"[majority vote: no answer in any of the {vote.total} completions]"
    tie = ", a tie broken by the earliest answer" if vote.tie else ""
    return (f"[majority vote: {vote.answer} with {vote.votes} of {vote.total} completions "
            f"({vote.answered} answered{tie})]")


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
        print(f"[solution: {c.solution_tokens} tokens, finish: {c.finish_reason}]")
        print(c.solution_text.strip())
    print()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .sampling_params import SamplingParams

        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            max_tokens=args.max_tokens,
            think_budget=args.think_budget,
            solution_budget=args.solution_budget,
            end_think=args.end_think,
            min_think=args.min_think,
        )
        if args.vote and args.n < 2:
            raise ElasticDecodeError("--vote needs -n 2 or more (a vote over one completion is that completion)")
        rows = read_prompts(args)
        if args.output is not None:
            check_output_file(args.output, "--output")

        from .llm import LLM

        llm = LLM(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                  quantization=args.quantization, max_model_len=args.max_model_len, num_scheduler_steps=args.num_scheduler_steps,
                  budget_mode=args.budget_mode, cuda_graphs=args.cuda_graphs, enforce_eager=args.enforce_eager,
                  tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size)
        tok = llm.engine.tokenizer
        encoded = []
        for i, row in enumerate(rows):
            if "messages" in row:
                encoded.append(tok.encode_chat(row["messages"]))
            elif args.no_chat_template:
                encoded.append(tok.encode(row["prompt"]))
            else:
                encoded.append(tok.encode_chat([{"role": "user", "content": row["prompt"]}]))
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    # Each prompt's row is written (and flushed) as soon as its completions finish, so an
    # interrupt or a late error keeps every finished row; a finished run is rewritten in prompt order.
    written: list[dict] = []
    sink = open(args.output, "w") if args.output is not None else None

    def keep(index: int, out) -> None:
        if sink is not None:
            record = _record(rows[index], index, out, args.vote)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            written.append(record)

    try:
        outputs = llm.generate(encoded, params, use_tqdm=len(rows) > 1, on_finished=keep)
    except (ElasticDecodeError, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print("interrupted" if interrupted else f"error: {e}", file=sys.stderr)
        if sink is not None:
            sink.close()
            print(f"wrote the {len(written)} of {len(rows)} rows that finished to {args.output} "
                  "(each with its prompt's \"index\")", file=sys.stderr)
        return 130 if interrupted else 2
    if sink is not None:
        sink.close()
        ordered = sorted(written, key=lambda r: r["index"])
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        os.replace(tmp, args.output)
        print(f"wrote {len(ordered)} rows to {args.output}")
    else:
        for i, (row, out) in enumerate(zip(rows, outputs)):
            _show(i, len(rows), row, out, llm.engine.tokenizer.decode, args.think_budget)
            if args.vote:
                print(_vote_line(out.vote()))
                print()
    print(llm.last_stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
