"""How many times the fused sampler reads each logits row, counted in Triton's interpreter.

The sampler's goal is to read a row about once (the GPU target: bytes per row <= 2x one read of the
row). This counts the bytes each row's kernels load from the logits (tests/load_counter.py wraps
the interpreter's loads) and checks every drawn token against the reference, on:

- the benchmark rows of bench_kernels.py: randn * 3 at the reference vocabulary (151936);
- rows of the embedded SmolLM2-135M's real next-token logits (vocab 49152), collected by sampling
  continuations of a few prompts with transformers (CPU, about a minute).

    python benchmarks/sampler_reads.py                # both, a few settings each
    python benchmarks/sampler_reads.py --rows 20 --no-model

A row read more than twice went through the exact fallback (a radix search over the whole row).
With --confidence the sampler also computes the token confidence (the kernel variant DeepConf and DEER run),
checked against the reference's: the reads show what that costs in memory traffic.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # count loads in the interpreter (before the kernels import)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from load_counter import count_loads  # noqa: E402

from elastic_decode.kernels import reference, sampling_batch  # noqa: E402
from elastic_decode.kernels.sample_with_budget import sample_with_budget  # noqa: E402

SETTINGS = [  # (temperature, top_k, top_p, min_p)
    (0.7, 50, 0.95, 0.0),  # the benchmark's
    (0.6, 0, 0.95, 0.0),  # DeepSeek-R1's recommendation
    (0.6, 20, 0.95, 0.0),  # Qwen3's thinking mode
    (1.0, 0, 0.95, 0.0),
    (1.0, 0, 1.0, 0.05),
    (1.0, 0, 1.0, 0.0),  # plain sampling (RL rollouts)
]


def model_logits(rows: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elastic_decode.models.loader import resolve_checkpoint

    path = resolve_checkpoint(None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = ["What is 17 * 23? Think step by step.", "Write a short poem about the sea.",
               "Explain why the sky is blue."]
    out = []
    for i, prompt in enumerate(prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        torch.manual_seed(i)
        gen = model.generate(ids, max_new_tokens=-(-rows // len(prompts)), do_sample=True, temperature=0.8,
                             output_logits=True, return_dict_in_generate=True)
        out += [step[0].float() for step in gen.logits]
    return torch.stack(out[:rows])


def measure(name: str, logits: torch.Tensor, settings, confidence: bool = False) -> str:
    n, vocab = logits.shape
    reads, equal, worst = [], 0, 0.0
    for i in range(n):
        row = logits[i : i + 1].contiguous()
        params, state = sampling_batch(1, *settings, seeds=[i], generated=1)
        with count_loads(row) as loaded:
            token, _ = sample_with_budget(row, params, state, confidence=confidence)
        ref_params, ref_state = sampling_batch(1, *settings, seeds=[i], generated=1)
        expected, _ = reference.sample_with_budget(row.float(), ref_params, ref_state, confidence=confidence)
        equal += int(token.item() == expected.item())
        worst = max(worst, abs(state.confidence.item() - ref_state.confidence.item()))
        reads.append(loaded[0] / (vocab * row.element_size()))
    reads_t = torch.tensor(reads)
    return (f"| {name} | {settings} | {n} | {reads_t.median():.3f} | {reads_t.mean():.3f} | {reads_t.max():.2f} "
            f"| {int((reads_t > 2).sum())} | {equal}/{n} |" + (f" {worst:.1e} |" if confidence else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40, help="rows of model logits per setting (default 40)")
    parser.add_argument("--bench-rows", type=int, default=4, help="randn * 3 rows at vocab 151936 (default 4)")
    parser.add_argument("--no-model", action="store_true", help="skip the embedded model's logits")
    parser.add_argument("--confidence", action="store_true", help="the variant that also computes token confidence")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    extra = " max confidence error |" if args.confidence else ""
    print("| rows | (T, top-k, top-p, min-p) | n | reads/row median | mean | max | rows > 2 reads | tokens = reference |"
          + extra)
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.confidence else ""))
    torch.manual_seed(0)
    bench = torch.randn(args.bench_rows, 151936) * 3
    print(measure("randn * 3, vocab 151936", bench, SETTINGS[0], args.confidence), flush=True)
    if not args.no_model:
        logits = model_logits(args.rows)
        for settings in SETTINGS:
            print(measure("SmolLM2-135M logits, vocab 49152", logits, settings, args.confidence), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s (interpreter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
