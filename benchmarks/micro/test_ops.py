"""Microbenchmarks (pytest-benchmark): each kernel op x provider at the embedded model's shapes and at a
CPU-sized slice of the reference shape, plus the block allocator and one scheduler step.

Providers: `reference` (the torch ops, the oracle), `cpu` (the C++ kernels, for the ops that have
one), `triton` (only where CUDA is present; the interpreter is not timed). `make microbench` runs

    .venv/bin/python -m pytest benchmarks/micro --benchmark-only --benchmark-group-by=func

so that each group compares the providers of one op side by side (at each shape, in the names). Not part of
`make test` (pyproject's testpaths is tests/).
"""
from __future__ import annotations

import pytest
import torch

from elastic_decode.worker.backend import reference_ops, triton_ops
from elastic_decode.kernels import cpu, sampling_batch

CUDA = torch.cuda.is_available()
# (name, q heads, kv heads, head_dim, hidden, intermediate, vocab, decode batch, context)
SHAPES = {
    "smollm2-135m": (9, 3, 64, 576, 1536, 49152, 16, 512),
    "qwen2.5-1.5b-slice": (12, 2, 128, 1536, 8960, 151936, 8, 1024),  # the reference shape, CPU-sized batch
}
BLOCK = 16


def providers(op: str) -> list[tuple[str, object]]:
    """(name, object with the op) for each implementation of `op`: the C++ one whether or not the CPU
    backend selects it (its prefill attention is measured here and not selected)."""
    found = [("reference", reference_ops())]
    if cpu.HAVE_CPU_KERNELS and hasattr(cpu, op):
        found.append(("cpu", cpu))
    triton = triton_ops() if CUDA else None
    if triton is not None:
        found.append(("triton", triton))
    return found


def device_for(provider: str) -> str:
    return "cuda" if provider == "triton" else "cpu"


def paged(shape: str, device: str, seqs: int, context: int):
    hq, hkv, d, *_ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    per_seq = -(-context // BLOCK)
    num_blocks = seqs * per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK, hkv, d, generator=g).to(device)
    v_cache = torch.randn(num_blocks, BLOCK, hkv, d, generator=g).to(device)
    tables = torch.randperm(num_blocks - 1, generator=g)[: seqs * per_seq].view(seqs, per_seq).int().to(device) + 1
    lens = torch.full((seqs,), context, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens


def cases(op: str):
    found = providers(op)
    if op == "linear" and cpu.HAVE_QUANTIZED_LINEAR:  # quantization="int4": 4-bit layers, an 8-bit LM head
        found.append(("cpu-int4", None))
    return [pytest.param(shape, name, ops, id=f"{op}-{shape}-{name}") for shape in SHAPES for name, ops in found]


def sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def timed(benchmark, device, fn):
    done = sync(device)

    def run():
        fn()
        done()

    benchmark(run)


@pytest.mark.parametrize("shape, provider, ops", cases("paged_decode_attention"))
def test_paged_decode_attention(benchmark, shape, provider, ops):
    device = device_for(provider)
    hq, _, d, _, _, _, seqs, context = SHAPES[shape]
    k_cache, v_cache, tables, lens = paged(shape, device, seqs, context)
    q = torch.randn(seqs, hq, d, device=device)
    timed(benchmark, device, lambda: ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5))


@pytest.mark.parametrize("shape, provider, ops", cases("paged_prefill_attention"))
def test_paged_prefill_attention(benchmark, shape, provider, ops):
    device = device_for(provider)
    hq, _, d, *_ = SHAPES[shape]
    new = 256  # one prompt of 256 tokens after a 256-token cached prefix
    k_cache, v_cache, tables, lens = paged(shape, device, 1, 2 * new)
    q = torch.randn(new, hq, d, device=device)
    cu = torch.tensor([0, new], dtype=torch.int32, device=device)
    timed(benchmark, device, lambda: ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, d**-0.5,
                                                                 max_new_tokens=new))


@pytest.mark.parametrize("shape, provider, ops", cases("rms_norm"))
def test_rms_norm_with_residual(benchmark, shape, provider, ops):
    device = device_for(provider)
    hidden, seqs = SHAPES[shape][3], SHAPES[shape][6]
    x, residual, w = (torch.randn(seqs, hidden, device=device), torch.randn(seqs, hidden, device=device),
                      torch.randn(hidden, device=device))
    timed(benchmark, device, lambda: ops.rms_norm(x, w, 1e-6, residual))


@pytest.mark.parametrize("shape, provider, ops", cases("silu_mul"))
def test_silu_mul(benchmark, shape, provider, ops):
    device = device_for(provider)
    width, seqs = SHAPES[shape][4], SHAPES[shape][6]
    gate, up = torch.randn(seqs, width, device=device), torch.randn(seqs, width, device=device)
    timed(benchmark, device, lambda: ops.silu_mul(gate, up))


@pytest.mark.parametrize("shape, provider, ops", cases("rope_write_kv"))
def test_rope_write_kv(benchmark, shape, provider, ops):
    device = device_for(provider)
    hq, hkv, d, _, _, _, seqs, context = SHAPES[shape]
    k_cache, v_cache, tables, _ = paged(shape, device, seqs, context)
    qkv = torch.randn(seqs, (hq + 2 * hkv) * d, device=device)
    q, k, v = (t.view(seqs, -1, d) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    positions = torch.full((seqs,), context - 1, device=device)
    table = torch.randn(context, d, device=device)
    slots = tables[:, -1].long() * BLOCK
    timed(benchmark, device, lambda: ops.rope_write_kv(q, k, v, positions, table, table, k_cache, v_cache, slots))


@pytest.mark.parametrize("shape, provider, ops", cases("sample_with_budget"))
def test_sample_with_budget(benchmark, shape, provider, ops):
    device = device_for(provider)
    vocab, seqs = SHAPES[shape][5], SHAPES[shape][6]
    logits = torch.randn(seqs, vocab, device=device)
    params, state = sampling_batch(seqs, temperature=0.7, top_k=50, top_p=0.95, device=device)
    timed(benchmark, device, lambda: ops.sample_with_budget(logits, params, state))


def test_block_allocator_allocate_and_free_64(benchmark):
    from elastic_decode._C import BlockAllocator

    allocator = BlockAllocator(4096)
    benchmark(lambda: allocator.free(allocator.allocate(64)))


def test_scheduler_decode_step_of_256_sequences(benchmark):
    from elastic_decode import SamplingParams
    from elastic_decode.core.block_manager import BlockManager
    from elastic_decode.core.scheduler import Scheduler
    from elastic_decode.core.sequence import Sequence

    manager = BlockManager(num_blocks=256 * 8, block_size=BLOCK)
    scheduler = Scheduler(manager, max_num_seqs=256, max_num_batched_tokens=1 << 20)
    for i in range(256):
        scheduler.add(Sequence(seq_id=i, request_id=i, sample_index=0, token_ids=list(range(i, i + 40)),
                               num_prompt_tokens=40, params=SamplingParams(), seed=i, marker=(1,), stop_ids=(2,),
                               max_new_tokens=64))
    scheduler.schedule()  # admits all 256 (the prefill); every later call plans a decode chunk of all of them
    benchmark(scheduler.schedule)


@pytest.mark.parametrize("layer", ["gate_up", "lm_head"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape, provider, ops", cases("linear"))
def test_linear(benchmark, shape, provider, ops, rows, layer):
    """The model's GEMMs: the MLP's packed gate/up projection and the LM head, at one row and at a batch
    (cpu-int4: the gate/up weights in 4 bits, the LM head in 8, quantized before timing)."""
    device = device_for(provider)
    hidden, width, vocab = SHAPES[shape][3:6]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * width if layer == "gate_up" else vocab, hidden, generator=g).to(device)
    x = torch.randn(rows, hidden, generator=g).to(device)
    linear = ops.linear if ops is not None else cpu.int8_linear if layer == "lm_head" else cpu.int4_linear
    with torch.inference_mode():
        timed(benchmark, device, lambda: linear(x, weight))
