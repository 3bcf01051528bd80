"""GPU kernel benchmarks at the reference shape (docs/architecture.md); one table for benchmarks/RESULTS.md.

Reference shape: Qwen2.5-1.5B attention (12 query heads, 2 KV heads, head_dim 128), bf16,
vocab 151936. For each kernel: a correctness check against the torch reference on the same
inputs, then the median time (triton.testing.do_bench, CUDA events), achieved GB/s over the
fewest bytes the op must move, and ratios against the baselines measured in the same run:

- copy bandwidth: a device-to-device copy of 1 GiB (read + write), the practical roofline;
- paged decode attention vs torch SDPA (flash backend) on the same lengths in contiguous layout;
- paged prefill attention vs SDPA (flash, causal) on contiguous q/k/v;
- the fused budget sampler (top-k 50 + top-p 0.95) vs torch sort-based top-p sampling, and vs
  one read of the logits at copy bandwidth;
- the fused small ops of the decode step at 256 rows (residual add + RMSNorm over hidden 1536,
  SiLU-mul over intermediate 8960) vs the unfused torch ops they replace (the reference).

    python benchmarks/bench_kernels.py            # needs a CUDA GPU
    OUT=/some/dir python benchmarks/bench_kernels.py  # also writes kernels.md there
"""
from __future__ import annotations

import os
import sys

import torch

Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB, BLOCK = 12, 2, 128, 151936, 16
HIDDEN, INTERMEDIATE = 1536, 8960


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def paged_cache(num_seqs: int, ctx: int, dtype):
    blocks_per_seq = ctx // BLOCK
    num_blocks = num_seqs * blocks_per_seq
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    tables = perm.view(num_seqs, blocks_per_seq)
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    return k, v, tables


def contiguous_kv(k_cache, v_cache, tables, ctx):
    """The same K/V as [num_seqs, KV_HEADS, ctx, HEAD_DIM] for SDPA."""
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def sdpa_flash(q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa(q, k, v, is_causal=causal, enable_gqa=True)


def bench_decode(rows, bandwidth):
    from elastic_decode.kernels import paged_decode_attention, reference

    for num_seqs, ctx in [(64, 4096), (256, 1024), (8, 16384), (1, 32768)]:
        k_cache, v_cache, tables = paged_cache(num_seqs, ctx, torch.bfloat16)
        lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(num_seqs, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        scale = HEAD_DIM**-0.5
        ours = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max_context_len=ctx)
        ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        err = rel_err(ours, ref)
        t_ours = median_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max_context_len=ctx))
        t_ref = median_ms(lambda: reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale))
        kc, vc = contiguous_kv(k_cache, v_cache, tables, ctx)
        qc = q[:, :, None, :]
        t_sdpa = median_ms(lambda: sdpa_flash(qc, kc, vc, causal=False))
        nbytes = 2 * num_seqs * ctx * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
        gbs = nbytes / t_ours / 1e6
        rows.append((f"decode attention {num_seqs}x{ctx}", t_ours, gbs, f"{gbs / bandwidth:.0%} of copy",
                     f"SDPA flash {t_sdpa:.3f} ms ({t_sdpa / t_ours:.2f}x)", f"reference {t_ref / t_ours:.1f}x", err))
        if (num_seqs, ctx) == (64, 4096):  # the target shape: sweep tokens per loop iteration
            for tile in (16, 32, 128):
                err_t = rel_err(paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max_context_len=ctx,
                                                       tile=tile), ref)
                t_tile = median_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                                                  max_context_len=ctx, tile=tile))
                gbs = nbytes / t_tile / 1e6
                rows.append((f"decode attention {num_seqs}x{ctx}, tile {tile}", t_tile, gbs,
                             f"{gbs / bandwidth:.0%} of copy", f"SDPA flash {t_sdpa:.3f} ms ({t_sdpa / t_tile:.2f}x)",
                             f"default tile {t_ours / t_tile:.2f}x", err_t))


def bench_prefill(rows, bandwidth):
    from elastic_decode.kernels import paged_prefill_attention, reference

    for num_seqs, ctx in [(16, 1024), (4, 4096)]:
        k_cache, v_cache, tables = paged_cache(num_seqs, ctx, torch.bfloat16)
        lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
        cu = torch.arange(0, (num_seqs + 1) * ctx, ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(num_seqs * ctx, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        scale = HEAD_DIM**-0.5
        run = lambda: paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale, max_new_tokens=ctx)  # noqa: E731
        err = rel_err(run(), reference.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale))
        t_ours = median_ms(run)
        kc, vc = contiguous_kv(k_cache, v_cache, tables, ctx)
        qc = q.view(num_seqs, ctx, Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        t_sdpa = median_ms(lambda: sdpa_flash(qc, kc, vc, causal=True))
        flops = 4 * num_seqs * Q_HEADS * HEAD_DIM * ctx * ctx / 2
        rows.append((f"prefill attention {num_seqs}x{ctx}", t_ours, flops / t_ours / 1e9, "TFLOP/s (causal)",
                     f"SDPA flash {t_sdpa:.3f} ms ({t_sdpa / t_ours:.2f}x)", "", err))


def torch_sort_top_p(logits, top_k, top_p, temperature):
    """The usual torch recipe: sort, cumulative sum, mask, renormalise, multinomial."""
    scaled = logits / temperature
    values, idx = scaled.sort(dim=-1, descending=True)
    values[:, top_k:] = float("-inf")
    probs = values.softmax(-1)
    cum = probs.cumsum(-1)
    probs = probs.masked_fill(cum - probs > top_p, 0.0)
    choice = torch.multinomial(probs, 1)
    return idx.gather(1, choice).squeeze(1)


def bench_sampler(rows, bandwidth):
    """256 x vocab rows (randn * 3): the issue's setting (T 0.7, top-k 50, top-p 0.95) in fp32 and in
    bf16 (the engine's logits on a GPU), top-p alone and plain sampling in bf16; against torch's
    sort-based top-k/top-p and against one read of the logits at copy bandwidth."""
    from elastic_decode.kernels import SOLVING, reference, sample_with_budget, sampling_batch

    n = 256
    for dtype, (temperature, top_k, top_p) in [(torch.float32, (0.7, 50, 0.95)), (torch.bfloat16, (0.7, 50, 0.95)),
                                               (torch.bfloat16, (0.6, 0, 0.95)), (torch.bfloat16, (1.0, 0, 1.0))]:
        logits = (torch.randn(n, VOCAB, device="cuda", dtype=torch.float32) * 3).to(dtype)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, seeds=range(n), device="cuda")
        params, state = sampling_batch(n, **settings)
        ours, _ = sample_with_budget(logits, params, state)
        ref, _ = reference.sample_with_budget(logits, *sampling_batch(n, **settings))
        agree = float((ours == ref).float().mean())

        def run():
            state.generated.zero_()
            state.phase.fill_(SOLVING)
            sample_with_budget(logits, params, state)

        t_ours = median_ms(run)
        t_sort = median_ms(lambda: torch_sort_top_p(logits, top_k or VOCAB, top_p, temperature))
        nbytes = logits.numel() * logits.element_size()
        read_ms = nbytes / bandwidth / 1e6
        rows.append((f"sampler {n}x{VOCAB} {str(dtype)[6:]} T {temperature} top-k {top_k} top-p {top_p}", t_ours,
                     nbytes / t_ours / 1e6, f"{t_ours / read_ms:.1f}x one read",
                     f"torch sort top-p {t_sort:.3f} ms ({t_sort / t_ours:.2f}x)",
                     f"tokens equal to reference: {agree:.1%}", 0.0))


def bench_fused(rows, bandwidth):
    """The decode step's small ops at 256 rows: fused Triton vs the unfused torch ops."""
    from elastic_decode.kernels import reference, rms_norm, silu_mul

    n, dtype = 256, torch.bfloat16
    x = torch.randn(n, HIDDEN, dtype=dtype, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=dtype, device="cuda")
    out, new_res = rms_norm(x, w, 1e-6, res)
    ref_out, ref_res = reference.rms_norm(x, w, 1e-6, res)
    err = max(rel_err(out, ref_out), rel_err(new_res, ref_res))
    t_ours = median_ms(lambda: rms_norm(x, w, 1e-6, res))
    t_ref = median_ms(lambda: reference.rms_norm(x, w, 1e-6, res))
    moved = 4 * x.numel() * x.element_size()  # read x and the residual, write both outputs
    rows.append((f"residual add + RMSNorm {n}x{HIDDEN}", t_ours, moved / t_ours / 1e6,
                 f"{100 * moved / t_ours / 1e6 / bandwidth:.0f}% of copy", "", f"unfused torch {t_ref:.4f} ms "
                 f"({t_ref / t_ours:.2f}x)", err))

    gate = torch.randn(n, INTERMEDIATE, dtype=dtype, device="cuda")
    up = torch.randn_like(gate)
    err = rel_err(silu_mul(gate, up), reference.silu_mul(gate, up))
    t_ours = median_ms(lambda: silu_mul(gate, up))
    t_ref = median_ms(lambda: reference.silu_mul(gate, up))
    moved = 3 * gate.numel() * gate.element_size()
    rows.append((f"SiLU-mul {n}x{INTERMEDIATE}", t_ours, moved / t_ours / 1e6,
                 f"{100 * moved / t_ours / 1e6 / bandwidth:.0f}% of copy", "", f"unfused torch {t_ref:.4f} ms "
                 f"({t_ref / t_ours:.2f}x)", err))


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (CPU results come from bench_e2e.py)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs()
    rows: list = []
    bench_decode(rows, bandwidth)
    bench_prefill(rows, bandwidth)
    bench_sampler(rows, bandwidth)
    bench_fused(rows, bandwidth)
    lines = [
        f"{name}, torch {torch.__version__}; measured copy bandwidth {bandwidth:.0f} GB/s; bf16 attention "
        f"({Q_HEADS} q heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, block {BLOCK}); fp32 logits",
        "",
        "| op | ours ms | GB/s (or TFLOP/s) | vs roofline | vs baseline | vs reference | rel. error |",
        "|---|---:|---:|---|---|---|---:|",
    ]
    for op, ms, rate, roof, base, ref, err in rows:
        lines.append(f"| {op} | {ms:.3f} | {rate:.0f} | {roof} | {base} | {ref} | {err:.1e} |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
