"""The compile gate: every Triton kernel compiles for sm_80 and sm_90 without a GPU.

Triton's interpreter (the rest of the suite) does not apply the compiler's rules, so a kernel
it runs can still fail to compile, spill registers or recompile mid-run. Here each kernel goes
through the real compiler (kernels/aot.py: a stand-in driver, the project's own launchers, the
engine's launch plans at the reference Qwen2.5-1.5B and SmolLM2-135M shapes, bf16/fp16/fp32).
The compiling runs in subprocesses: this process has the interpreter on (conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

KERNELS = {"_rope_write_kv_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel", "_rms_norm_kernel",
           "_silu_mul_kernel", "_scan_kernel", "_finish_kernel"}
DTYPES = {"bfloat16", "float16", "float32"}


def compiler_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def python(code_or_args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], env=compiler_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def variants() -> dict[int, list[dict]]:
    """Every compiled variant per target, both targets compiled side by side."""
    def compile_for(arch):
        proc = python(["-m", "elastic_decode.kernels.aot", "--arch", str(arch), "--json"])
        assert proc.returncode == 0, f"sm_{arch} compile failed:\n{proc.stderr[-4000:]}"
        return arch, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(compile_for, (80, 90)))


@pytest.mark.slow
def test_every_kernel_compiles_for_every_target_dtype_and_shape(variants):
    for arch, rows in variants.items():
        for dtype in DTYPES:
            compiled = {r["kernel"] for r in rows if r["dtype"] == dtype}
            assert compiled == KERNELS, (arch, dtype, KERNELS - compiled)
        for launch in ("rope_write_kv", "rope_write_kv + q/k norm", "paged_decode_attention", "paged_decode_attention split-KV", "rms_norm", "rms_norm + residual",
                       "sample_with_budget", "sample_with_budget + confidence"):
            assert any(r["launch"] == launch for r in rows), (arch, launch)


@pytest.mark.slow
def test_no_register_spills_on_any_target_dtype_or_shape(variants):
    """fp32 included (its exact dot holds more per thread: under triton 3.6, the GPU machines' version, the
    fp32 decode kernel at head_dim 128 spilled ~1.9 KB on sm_90 before its tile and warps were set for it),
    and the wide models, where rms_norm holds an 8192-wide row per program."""
    spilled = [(arch, r["kernel"], r["dtype"], r["shape"], r["spill_stores"], r["spill_loads"])
               for arch, rows in variants.items() for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled
    assert all(r["registers"] > 0 for rows in variants.values() for r in rows)  # ptxas reported
    assert {"qwen2.5-32b", "smollm2-135m", "qwen2.5-1.5b"} <= {r["shape"] for r in variants[90]}


@pytest.mark.slow
def test_kernels_promised_exact_compile_to_correctly_rounded_instructions(variants):
    """What the interpreter cannot show: on hardware Triton contracts a*b + c into an FMA and lowers `/`,
    sqrt and exp to approximate instructions. The launches promised the reference's roundings (RoPE + the
    cache write, RMSNorm) must have none of them in their PTX; the others are held to a stated tolerance
    (aot.EXACT_ON_GPU) and their approximate instructions are counted, not refused."""
    from elastic_decode.kernels.aot import CORRECTLY_ROUNDED_LAUNCHES, EXACT_ON_GPU

    for arch, rows in variants.items():
        checked = [r for r in rows if r["launch"] in CORRECTLY_ROUNDED_LAUNCHES]
        assert {r["kernel"] for r in checked} == {"_rope_write_kv_kernel", "_rms_norm_kernel"}
        assert all(r["fma"] == 0 and r["approx"] == 0 for r in checked), \
            [(r["kernel"], r["dtype"], r["launch"], r["fma"], r["approx"]) for r in checked if r["fma"] or r["approx"]]
        assert any(r["approx"] for r in rows if r["kernel"] == "_decode_kernel")  # the scan sees them where they are
    assert set(EXACT_ON_GPU) == KERNELS  # every kernel states what it promises


RESPECIALISATION = r"""
import json
from elastic_decode.kernels import aot
counts = [aot.variant_counts(90, num_seqs=n, context_len=c) for n, c in ((1, 3), (5, 33), (16, 300))]
print(json.dumps(counts))
"""


@pytest.mark.slow
def test_batches_of_any_size_and_length_reuse_the_same_variants():
    """Batch size, context lengths, block-table width (1 block, 3, 19) are runtime values: the
    plans at three batch shapes compile exactly the same number of variants per kernel."""
    proc = python(["-c", RESPECIALISATION])
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, *others = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(counts == first for counts in others), (first, others)
    from elastic_decode.kernels.aot import DTYPES, SHAPES

    layouts = {(s.num_q_heads // s.num_kv_heads, s.head_dim) for s in SHAPES}  # the constexprs a shape sets
    assert first["_decode_kernel"] == 2 * len(DTYPES) * len(layouts)  # split or not x dtypes x head layouts


SHADOW_ENGINE = r"""
import json, sys
import torch
from elastic_decode import LLM, SamplingParams
from elastic_decode.engine import startup
from elastic_decode.kernels import aot, reference
from elastic_decode.models.batch import KernelOps
import elastic_decode.kernels as triton_ops

def shadow(name):
    # The Triton launcher first (under the stand-in driver it compiles and launches nothing),
    # then the reference, whose result the engine uses: real arguments, real outputs.
    launcher, ref = getattr(triton_ops, name), getattr(reference, name)
    def both(*args, **kwargs):
        launcher(*args, **kwargs)
        return ref(*args, **kwargs)
    return both

llm = LLM(sys.argv[1], dtype="float32", device="cpu", backend="reference", block_size=16, seed=0,
          num_scheduler_steps=3, max_num_seqs=8)
engine = llm.engine
names = ["rope_write_kv", "paged_decode_attention", "paged_prefill_attention", "sample_with_budget", "rms_norm", "silu_mul"]
engine.ops = engine.runner.ops = KernelOps(name="shadow", **{n: shadow(n) for n in names})
kernels = aot.jit_kernels()
with aot.stand_in_driver(90):
    startup.compile_kernels(engine.spec, 16, torch.float32, torch.device("cpu"))
    warm = {n: len(fn.device_caches[0][0]) for n, fn in kernels.items()}
    prompts = ["The quick brown fox", "In 1905, Albert Einstein published his", "1 2 3", "a b c d e f g h i j k l"]
    params = [SamplingParams(temperature=0.0, max_tokens=40, think_budget=7, solution_budget=9),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=25, think_budget=3, end_think=(300, 301, 302)),
              SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=30, n=3, stop_token_ids=(5, 6, 7, 8, 9)),
              SamplingParams(temperature=0.7, min_p=0.1, seed=3, max_tokens=20, think_budget=9, min_think=4)]
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(prompts[:1], params[:1], use_tqdm=False)
    llm.generate([prompts[3] * 12], SamplingParams(temperature=1.0, max_tokens=5), use_tqdm=False)
    llm.generate(prompts[:2], SamplingParams(temperature=0.6, top_p=0.95, seed=4, n=2, think_budget=12, max_tokens=20,
                                             early_stop="deepconf", deepconf_threshold=1e9, confidence_window=3),
                 use_tqdm=False)  # the sampler's confidence variant
    after = {n: len(fn.device_caches[0][0]) for n, fn in kernels.items()}
print(json.dumps({"warm": warm, "after": after}))
"""


@pytest.mark.slow
def test_the_engine_compiles_nothing_after_its_start_up_warm_up(tiny_models):
    """The engine's own launches (prefills and multi-step decode chunks of varied batches, markers,
    stop lists, min_think, a long prompt, token confidence) hit only the variants its start-up plan compiled."""
    proc = python(["-c", SHADOW_ENGINE, str(tiny_models["qwen3"])])
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after"] == result["warm"]
    assert result["warm"]["_scan_kernel"] >= 1 and result["warm"]["_prefill_kernel"] == 1
