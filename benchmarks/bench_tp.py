"""Tensor and data parallelism on one machine: TP=N and DP=N against one engine, same prompts, same tokens.

Greedy decoding of --batch sequences of --new-tokens tokens each (EOS ignored) on the embedded
SmolLM2-135M-Instruct (or --model), after one untimed warm-up run per engine. Reported: seconds,
output tokens/s, and on rank 0 the seconds spent inside the collectives (all-reduce after o_proj and
down_proj and for the vocab-parallel embedding; the all-gather of the logits) with their count, which
is what the communication costs. Then data parallelism: --dp-sizes replicas on the same prompts
(--batch x 2 of them, so each replica gets a batch). Prints markdown tables for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_tp.py --device cpu --batch 8 --new-tokens 32 --sizes 1,3

(The embedded model has 9 attention heads and 3 kv heads: 3 is its smallest size above 1.)
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from elastic_decode import LLM, SamplingParams
from elastic_decode.distributed import group as parallel


def timed_collectives() -> dict:
    """Wrap rank 0's collectives with wall-clock counters."""
    spent = {"seconds": 0.0, "calls": 0}
    for name in ("all_reduce", "all_gather_last"):
        real = getattr(parallel.Group, name)

        def wrapper(self, x, _real=real):
            start = time.perf_counter()
            out = _real(self, x)
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1
            return out

        setattr(parallel.Group, name, wrapper)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="1,3", help="tensor-parallel sizes, the first the baseline")
    parser.add_argument("--dp-sizes", default="1,2", help="data-parallel sizes, the first the baseline")
    args = parser.parse_args()

    spent = timed_collectives()
    prompts = [[1, 504, 3458, 282, 1345 + i, 30, 198] for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    rows, tokens = [], {}
    sizes = [int(x) for x in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    for tp in sizes:
        torch.set_num_threads(cores)  # an engine of several CPU processes lowers it for the process
        llm = LLM(args.model, device=args.device, tensor_parallel_size=tp, kv_cache_memory_gb=0.25)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        spent.update(seconds=0.0, calls=0)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens[tp] = [o.outputs[0].token_ids for o in outs]
        rows.append((tp, seconds, args.batch * args.new_tokens / seconds, spent["seconds"], spent["calls"]))
        llm.close()
        del llm
    print(f"device: {args.device} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}); model: "
          f"{args.model or 'embedded SmolLM2-135M-Instruct'}; {args.batch} sequences x {args.new_tokens} tokens, "
          f"greedy; every size's tokens equal the first's: {all(tokens[t] == tokens[sizes[0]] for t in sizes)}")
    print()
    print("| tensor_parallel_size | seconds | output tok/s | rank 0 in collectives (s) | collectives | speed vs first |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tp, seconds, rate, coll, calls in rows:
        print(f"| {tp} | {seconds:.2f} | {rate:.1f} | {coll:.2f} | {calls} | {rows[0][1] / seconds:.2f}x |")

    prompts = [[1, 504, 3458, 282, 1345 + i, 30, 198] for i in range(2 * args.batch)]
    dp_rows, dp_tokens = [], {}
    dp_sizes = [int(x) for x in args.dp_sizes.split(",")]
    for dp in dp_sizes:
        torch.set_num_threads(cores)
        llm = LLM(args.model, device=args.device, data_parallel_size=dp, kv_cache_memory_gb=0.25)
        llm.generate(prompts[:dp], params, use_tqdm=False)  # warm-up, every replica
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        dp_tokens[dp] = [o.outputs[0].token_ids for o in outs]
        dp_rows.append((dp, seconds, len(prompts) * args.new_tokens / seconds))
        llm.close()
        del llm
    print()
    print(f"data parallelism: {len(prompts)} sequences x {args.new_tokens} tokens; every size's tokens equal the "
          f"first's: {all(dp_tokens[d] == dp_tokens[dp_sizes[0]] for d in dp_sizes)}")
    print()
    print("| data_parallel_size | seconds | output tok/s | speed vs first |")
    print("| --- | --- | --- | --- |")
    for dp, seconds, rate in dp_rows:
        print(f"| {dp} | {seconds:.2f} | {rate:.1f} | {dp_rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
