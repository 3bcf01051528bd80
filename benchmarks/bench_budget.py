"""Budgeted decoding end to end: in-kernel forcing vs the two-call recipe vs HF `generate`.

Every sequence thinks for exactly t tokens (EOS ignored), gets the end-of-thinking marker
forced, and writes exactly s solution tokens; greedy. Providers, all in one run:

- elastic_decode, in-kernel forcing, 1-step and K-step decode chunks (--steps), and on CUDA
  K-step chunks replayed from CUDA graphs;
- elastic_decode, two-call recipe (think with max_tokens = t, append the marker, prefill
  again, solve with max_tokens = s) on the same engine;
- HF transformers `generate` (static cache on CUDA) with the same budget enforced by a
  LogitsProcessor, as a transformers user would write it;
- the bandwidth roofline: weight + KV bytes read per decode step over measured copy bandwidth.

Then a profile of one decode chunk of the engine (forward GEMMs, attention, the rest of the
forward, logits, sampler, host) so the next bottleneck has a name.

    .venv/bin/python benchmarks/bench_budget.py                     # CPU: embedded model, 16 seqs
    python benchmarks/bench_budget.py --shape reference --seqs 256 --prompt-len 256 \\
        --think 1024 --solution 256                                 # GPU: the reference shape

`--shape reference` builds a random-weight Qwen2 checkpoint at the reference shape (docs/architecture.md)
(hidden 1536, 28 layers, 12/2 heads, head_dim 128, vocab 151936) with a tiny word-level
tokenizer, so nothing is downloaded; speed does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = ["What is 17 * 23?", "Name three prime numbers larger than 50.", "Why is the sky blue?",
             "Write a haiku about autumn.", "Explain what a hash table is.", "What is the derivative of x^3?"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Best of `repeats` after one warm-up run (compiles kernels, fills caches)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth_gbs(device: str) -> float:
    """Read + write bytes per second of a large tensor copy: the practical memory roofline."""
    n = 2**30 if device.startswith("cuda") else 2**28
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 5)
    return 2 * n / seconds / 1e9


def reference_checkpoint(folder: Path) -> Path:
    """A random-weight Qwen2 at the reference shape (docs/architecture.md) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, eos_token_id=1, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    words = ["<pad>", "<eos>", "</think>"] + [f"w{i}" for i in range(997)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    return folder


class BudgetProcessor:
    """HF LogitsProcessor: after t generated tokens force the marker, then allow s more tokens.

    What a transformers user writes for a thinking budget (the peers: README): the forced
    logits are masked to -inf except the marker token, row by row, every step.
    """

    def __init__(self, prompt_width: int, think: int, marker: list[int]):
        self.start, self.think, self.marker = prompt_width, think, marker

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start  # tokens generated so far (same for every row)
        if self.think <= step < self.think + len(self.marker):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.marker[step - self.think]] = 0.0
            return forced
        return scores


def roofline_tokens_per_s(spec, dtype_bytes: int, n_weights: int, seqs: int, prompt: int, new: int,
                          bandwidth: float) -> float:
    """Decode tokens/s if every step only read the weights and the batch's KV at `bandwidth`."""
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype_bytes
    seconds = 0.0
    for step in range(new):
        seconds += (n_weights * dtype_bytes + seqs * (prompt + step + 1) * kv_per_token) / (bandwidth * 1e9)
    return seqs * new / seconds


def profile_chunk(llm, prompts, params, device: str) -> dict[str, float]:
    """Per-step milliseconds of one engine run's decode work, by part (CPU times on CPU;
    on CUDA the device time of the same labelled ranges)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    engine = llm.engine
    ops = engine.runner.ops

    def labelled(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    engine.runner.ops = dataclasses.replace(
        ops, paged_decode_attention=labelled("part:attention", ops.paged_decode_attention),
        rope_write_kv=labelled("part:attention", ops.rope_write_kv),
        sample_with_budget=labelled("part:sampler", ops.sample_with_budget),
        rms_norm=labelled("part:norm+silu", ops.rms_norm), silu_mul=labelled("part:norm+silu", ops.silu_mul))
    model = engine.runner.model
    forward, logits = model.forward, model.compute_logits
    model.forward = labelled("part:forward", forward)
    model.compute_logits = labelled("part:logits", logits)
    run = engine.runner.run
    engine.runner.run = labelled("part:step", run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with profile(activities=activities) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            sync(device)
    finally:
        engine.runner.ops, engine.runner.run = ops, run
        del model.forward, model.compute_logits
    cuda = device.startswith("cuda")
    totals: dict[str, float] = {}
    gemm = 0.0
    for e in prof.key_averages():
        t = (e.device_time_total if cuda else e.cpu_time_total) / 1e3
        if e.key.startswith("part:"):
            totals[e.key[5:]] = t
        elif e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            gemm += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
    totals["gemm"] = gemm
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("embedded", "reference"), default="embedded",
                   help="embedded: SmolLM2-135M (CPU default); reference: random Qwen2-1.5B shape (GPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (0: chat-templated questions)")
    p.add_argument("--think", type=int, default=64, help="t: thinking tokens (exactly, EOS ignored)")
    p.add_argument("--solution", type=int, default=32, help="s: solution tokens (exactly)")
    p.add_argument("--steps", type=int, default=8, help="K of the multi-step provider")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per provider (best kept)")
    p.add_argument("--skip-hf", action="store_true", help="leave out HF generate (slow at large shapes)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json (default $OUT)")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from elastic_decode import LLM, SamplingParams
    from elastic_decode.models.loader import resolve_checkpoint

    tmp = None
    if args.shape == "reference":
        tmp = tempfile.TemporaryDirectory()
        path = reference_checkpoint(Path(tmp.name))
        dtype = torch.bfloat16
    else:
        path = resolve_checkpoint(None)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    engines = {
        "in-kernel, 1 step": LLM(str(path), dtype=dtype_name, device=device, seed=0, max_num_seqs=args.seqs),
    }
    base = engines["in-kernel, 1 step"]
    engines[f"in-kernel, {args.steps} steps"] = LLM(str(path), dtype=dtype_name, device=device, seed=0,
                                                    max_num_seqs=args.seqs, num_scheduler_steps=args.steps)
    if device.startswith("cuda"):
        engines[f"in-kernel, {args.steps} steps, CUDA graphs"] = LLM(
            str(path), dtype=dtype_name, device=device, seed=0, max_num_seqs=args.seqs,
            num_scheduler_steps=args.steps, cuda_graphs=True)
    engines["two-call"] = LLM(str(path), dtype=dtype_name, device=device, seed=0, max_num_seqs=args.seqs,
                              budget_mode="two-call")
    tok = base.engine.tokenizer
    if args.prompt_len:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 1000, (args.seqs, args.prompt_len), generator=g).tolist()
    else:
        prompts = [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                   for i in range(args.seqs)]
    marker = list(tok.marker(None))
    params = SamplingParams(temperature=0.0, think_budget=args.think, solution_budget=args.solution,
                            ignore_eos=True)
    new = args.think + len(marker) + args.solution

    results = {}
    for name, llm in engines.items():
        def ours(llm=llm):
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == new for o in outs), "a sequence stopped early"
        results[name] = timed(ours, device, args.repeats)
    check = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    for name in list(engines)[1:]:
        same = check == [o.outputs[0].token_ids for o in engines[name].generate(prompts, params, use_tqdm=False)]
        print(f"{name}: same tokens as in-kernel 1 step: {same}")

    if not args.skip_hf:
        from transformers import AutoModelForCausalLM, LogitsProcessorList

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        # Like ignore_eos: EOS is an ordinary token, emitted when it is the argmax. (min_new_tokens
        # would instead mask it, and the greedy continuations would differ from the first EOS on.)
        hf.generation_config.eos_token_id = None
        width = max(len(x) for x in prompts)
        pad = tok.pad_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=device)
        extra = {"cache_implementation": "static"} if device.startswith("cuda") else {}

        def theirs():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=pad, logits_processor=LogitsProcessorList(
                                      [BudgetProcessor(width, args.think, marker)]), **extra)
            assert out.shape[1] == width + new
            return out

        results["HF generate + budget LogitsProcessor"] = timed(theirs, device, args.repeats)
        hf_tokens = theirs()[:, width:].tolist()
        rows_equal = sum(a == b for a, b in zip(hf_tokens, check))
        first = min((next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(hf_tokens, check)
                     if a != b), default=None)
        print(f"HF generate: same tokens as in-kernel 1 step in {rows_equal} of {len(check)} rows"
              + (f" (earliest difference at output token {first})" if first is not None else ""))
        del hf

    bandwidth = copy_bandwidth_gbs(device)
    spec = base.engine.spec
    n_weights = sum(p.numel() for p in base.engine.model.parameters())
    mean_prompt = sum(len(x) for x in prompts) // len(prompts)
    roof = roofline_tokens_per_s(spec, dtype.itemsize, n_weights, args.seqs, mean_prompt, new, bandwidth)
    parts = profile_chunk(engines[f"in-kernel, {args.steps} steps"], prompts, params, device)

    tokens = args.seqs * new
    where = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"\n{where}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.shape} shape "
          f"({n_weights / 1e6:.0f}M params, {dtype_name}); {args.seqs} seqs x (prompt {mean_prompt} + t {args.think}"
          f" + marker {len(marker)} + s {args.solution}) greedy; copy bandwidth {bandwidth:.1f} GB/s\n")
    print("| provider | s | output tok/s | in-kernel 1 step / this (time) | % of roofline |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.1f} | "
              f"{results['in-kernel, 1 step'] / seconds:.2f}x | {100 * tokens / seconds / roof:.0f}% |")
    print(f"| bandwidth roofline (decode only) | {tokens / roof:.2f} | {roof:.1f} | | 100% |")
    step_total = parts.get("step", 0.0)
    print(f"\nprofile of one in-kernel {args.steps}-step run (ms, all steps incl. prefill):")
    for key in ("step", "forward", "gemm", "attention", "norm+silu", "logits", "sampler"):
        print(f"  {key:<10} {parts.get(key, 0.0):10.1f}  ({100 * parts.get(key, 0.0) / max(step_total, 1e-9):.0f}%)")
    host = step_total - parts.get("forward", 0.0) - parts.get("logits", 0.0) - parts.get("sampler", 0.0)
    print(f"  {'host+rest':<10} {host:10.1f}  ({100 * host / max(step_total, 1e-9):.0f}%)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_budget.json").write_text(json.dumps(
            {"device": where, "args": vars(args), "seconds": results, "roofline_tokens_per_s": roof,
             "bandwidth_gbs": bandwidth, "profile_ms": parts}, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
