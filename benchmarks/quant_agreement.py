"""How far weight-only int4 moves the embedded model: teacher-forced top-1 agreement with float32.

HF's SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized to float32) greedily writes --new-tokens
tokens for each prompt; then, on those same token sequences, the fraction of positions where the
argmax of the next-token logits is unchanged when the decoder Linears run on kernels/cpu.int4_linear,
once with the LM head on the 8-bit GEMM (what LLM(quantization="int4") computes with) and once with the
LM head in 4 bits too. Teacher-forced, so one flip does not derail the rest. (The embedded model is a
Q4_1 GGUF with a Q8_0 embedding: the engine's setting gives back its own weights.)

    .venv/bin/python benchmarks/quant_agreement.py
"""
from __future__ import annotations

import argparse

import torch

from bench_e2e import QUESTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elastic_decode.kernels import cpu
    from elastic_decode.models.loader import resolve_checkpoint

    path = resolve_checkpoint(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    sequences = []
    with torch.no_grad():
        for question in QUESTIONS:
            text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            sequences.append((ids.shape[1], out))

    def predictions():
        with torch.no_grad():
            return torch.cat([model(out).logits[0, n - 1:-1].argmax(-1) for n, out in sequences])

    dense = torch.nn.Linear.forward
    expected = predictions()
    print(f"SmolLM2-135M-Instruct, {len(sequences)} prompts x {args.new_tokens} greedy float32 tokens, "
          f"teacher-forced top-1 agreement with float32:")
    for head in ("8-bit", "4-bit"):
        def forward(self, x, head=head):
            linear = cpu.int8_linear if head == "8-bit" and self is model.lm_head else cpu.int4_linear
            return linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(*x.shape[:-1], -1)

        torch.nn.Linear.forward = forward
        try:
            got = predictions()
        finally:
            torch.nn.Linear.forward = dense
        agree = int((got == expected).sum())
        print(f"  4-bit layers, LM head {head}: {agree} / {expected.numel()} = {agree / expected.numel():.3f}")


if __name__ == "__main__":
    main()
