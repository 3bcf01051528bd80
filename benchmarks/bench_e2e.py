"""End-to-end decode throughput: this engine vs HF transformers `generate`, same prompts, same tokens.

CPU, the embedded SmolLM2-135M-Instruct at each of --dtypes (both sides in that dtype), greedy (or with
--top-p, sampled at --temperature with that nucleus on both sides, the demo's setting), every
sequence generating exactly --new-tokens tokens (EOS ignored on both sides), batch sizes from
--batch-sizes, the engine on each of --backends (cpu: the C++ ops, packed-weight GEMMs, sort-free sampler;
reference: the torch ops; cpu+int4: the cpu backend with LLM(quantization="int4"), HF staying in the
dtype). Where the optional `llama_cpp` package is installed (llama-cpp-python; never a CI dependency), a
batch-1 row for llama.cpp on the same embedded GGUF (its own Q4_1 / Q8_0 kernels), fed the same prompt
token ids, greedy, on torch's thread count; its HF column is HF's batch-1 run of the first dtype. Each
provider runs once
untimed (warm-up), then --repeats timed runs; the best is reported. Prints a markdown table for
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_e2e.py --batch-sizes 1,16 --new-tokens 64 --dtypes float32,bfloat16
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

QUESTIONS = [
    "What is 17 * 23?",
    "Name three prime numbers larger than 50.",
    "Why is the sky blue? Answer in one paragraph.",
    "Write a haiku about autumn.",
    "Explain what a hash table is.",
    "If a train leaves at 3pm and travels 120 km at 80 km/h, when does it arrive?",
    "Translate 'good morning' into French and Spanish.",
    "What is the derivative of x^3 + 2x?",
]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per provider (best kept)")
    parser.add_argument("--backends", default="cpu,reference",
                        help="engine backends, comma-separated; BACKEND+int4 adds quantization='int4'")
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16, comma-separated")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample with this nucleus at --temperature instead of greedy decoding (both sides)")
    parser.add_argument("--temperature", type=float, default=0.6, help="with --top-p (default 0.6)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from elastic_decode import LLM
    from elastic_decode.models.loader import resolve_checkpoint

    torch.manual_seed(0)
    path = resolve_checkpoint(None)
    n_new = args.new_tokens
    rows = []
    for dtype in args.dtypes.split(","):
        engines = {}
        for name in args.backends.split(","):
            backend, _, quantization = name.partition("+")
            engines[name] = LLM(dtype=dtype, device="cpu", backend=backend, quantization=quantization or None)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        rows += run_dtype(dtype, engines, hf, args)
        del engines, hf
    rows += run_llama_cpp(rows, args)

    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; SmolLM2-135M, {decoding(args)}, {n_new} new tokens per sequence\n")
    print("| dtype | batch | backend | tokens | elastic_decode s | tok/s | HF generate s | tok/s | ratio (ours / HF) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for dtype, batch, name, tokens, t_ours, t_hf in rows:
        print(f"| {dtype} | {batch} | {name} | {tokens} | {t_ours:.2f} | {tokens / t_ours:.1f} | {t_hf:.2f} | "
              f"{tokens / t_hf:.1f} | {t_hf / t_ours:.2f}x |")


def run_llama_cpp(rows, args) -> list[tuple]:
    """The batch-1 row of llama.cpp on the embedded GGUF, or none where llama_cpp is not installed or batch
    1 was not asked for."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return []
    hf_row = next((row for row in rows if row[1] == 1), None)
    if hf_row is None or args.top_p is not None:  # greedy only: its sampler is not the same computation
        return []
    from transformers import AutoConfig

    from elastic_decode.models.loader import embedded_gguf_path, resolve_checkpoint
    from elastic_decode.engine.tokenizer import Tokenizer

    path = resolve_checkpoint(None)  # the engine's prompt ids (its chat template), as in the batch-1 rows
    tok = Tokenizer(path, AutoConfig.from_pretrained(path))
    prompt = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    model = Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_threads=torch.get_num_threads(),
                  verbose=False)

    def theirs():
        produced = 0
        for _ in model.generate(prompt, temp=0.0, reset=True):
            produced += 1
            if produced == args.new_tokens:
                break

    return [("Q4_1 GGUF", 1, "llama.cpp", args.new_tokens, best_of(theirs, args.repeats), hf_row[5])]


def decoding(args) -> str:
    return "greedy" if args.top_p is None else f"sampled (temperature {args.temperature}, top-p {args.top_p})"


def run_dtype(dtype, engines, hf, args) -> list[tuple]:
    """(dtype, batch, backend, tokens, our seconds, HF seconds) for each batch size and backend."""
    from elastic_decode import SamplingParams

    llm = next(iter(engines.values()))
    tok = llm.engine.tokenizer
    hf_tok = llm.tokenizer
    hf_tok.padding_side = "left"
    n_new = args.new_tokens
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]
        sampled = args.top_p is not None
        params = SamplingParams(temperature=args.temperature if sampled else 0.0, top_p=args.top_p or 1.0, seed=0,
                                max_tokens=n_new, ignore_eos=True)

        def ours(engine):
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == n_new for o in outs)

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[hf_tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def theirs():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=sampled, pad_token_id=hf_tok.pad_token_id,
                                  **(dict(temperature=args.temperature, top_p=args.top_p, top_k=0) if sampled else {}))
            assert out.shape[1] == width + n_new

        t_hf = best_of(theirs, args.repeats)
        for name, engine in engines.items():
            rows.append((dtype, batch, name, batch * n_new, best_of(lambda: ours(engine), args.repeats), t_hf))
    return rows


if __name__ == "__main__":
    main()
