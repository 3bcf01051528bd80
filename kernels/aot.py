"""Ahead-of-time compilation of every Triton kernel at the engine's launch shapes, with no GPU.

Triton's interpreter (the CPU tests) does not apply the compiler's rules: code it runs can still
fail to compile (a module-level int read inside a kernel, a constexpr misuse), spill registers or
need more shared memory than a GPU has. This module compiles the real thing for `sm_80` and
`sm_90` on a CPU-only machine:

- `StandInDriver` is an active Triton driver that reports a `GPUTarget` and launches nothing, so
  the project's own launchers run unchanged (their checks, padding, constexpr choices and
  argument specialisation are those of a real launch) and Triton compiles through its full
  pipeline down to a cubin with the wheel's `ptxas`.
- `launch_plan(shape, dtype)` is every launch the engine makes for a model of that shape: each
  op with the argument values that reach the kernels (variants such as split-KV on and off
  included). On CUDA the engine runs the same plan once at start-up to compile its kernels
  before any request (LLMEngine warm-up).
- `compile_plans(arch)` runs the plans under the stand-in driver and returns each compiled
  variant with its ptxas resource line (registers, spills, shared memory) and what its PTX says
  about exactness: contracted multiply-adds (`fma.rn.f32`) and approximate instructions
  (`ex2.approx`, `div.full`, ...), which the interpreter never shows (it computes in numpy).
  `EXACT_ON_GPU` states per kernel what it promises on hardware; the gate checks the instructions
  behind the claim (CORRECTLY_ROUNDED_LAUNCHES).

Run `python -m elastic_decode.kernels.aot --arch 90` to see the variants; the CI gate is
tests/test_compile_gate.py and the fuller static report is benchmarks/gpu_static.py. The
interpreter must be off in the process that compiles (TRITON_INTERPRET unset), so the tests
call this module in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import budget_state

# The op modules (the package's attributes of the same names are the launchers, not the modules).
rope_write_kv, paged_decode_attention, paged_prefill_attention, rms_norm, silu_mul, sample_with_budget = (
    importlib.import_module(f"{__package__}.{name}") for name in
    ("rope_write_kv", "paged_decode_attention", "paged_prefill_attention", "rms_norm", "silu_mul",
     "sample_with_budget"))
KERNEL_MODULES = (rope_write_kv, paged_decode_attention, paged_prefill_attention, rms_norm, silu_mul,
                  sample_with_budget)
ARCHS = (80, 90)  # A100, H100
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Per-SM limits used for the occupancy figures (CUDA programming guide, compute capability
# tables): warps, resident programs, 32-bit registers, shared memory per SM and per program.
SM_LIMITS = {
    80: dict(warps=64, programs=32, regs=65536, smem=167936, smem_per_program=166912, sms=108),
    90: dict(warps=64, programs=32, regs=65536, smem=233472, smem_per_program=232448, sms=132),
}


@dataclass(frozen=True)
class ModelShape:
    """What the kernels see of a model: head layout, widths, vocabulary, cache block."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    block_size: int = 16


# The reference shape (docs/architecture.md), the embedded model, and two wide ones (a 32B reasoning model such as
# QwQ-32B / DeepSeek-R1-Distill-Qwen-32B, and a 70B Llama): rms_norm holds a whole row per program,
# so its register use grows with the hidden width.
QWEN25_1_5B = ModelShape("qwen2.5-1.5b", num_q_heads=12, num_kv_heads=2, head_dim=128, hidden=1536,
                         intermediate=8960, vocab=151936)
SMOLLM2_135M = ModelShape("smollm2-135m", num_q_heads=9, num_kv_heads=3, head_dim=64, hidden=576,
                          intermediate=1536, vocab=49152)
QWEN25_32B = ModelShape("qwen2.5-32b", num_q_heads=40, num_kv_heads=8, head_dim=128, hidden=5120,
                        intermediate=27648, vocab=152064)
LLAMA3_70B = ModelShape("llama3-70b", num_q_heads=64, num_kv_heads=8, head_dim=128, hidden=8192,
                        intermediate=28672, vocab=128256)
SHAPES = (QWEN25_1_5B, SMOLLM2_135M, QWEN25_32B, LLAMA3_70B)

# What each kernel computes on a GPU, compared with its torch reference (kernels/reference.py, run on the
# CPU). "exact": the reference's roundings, bit for bit: launched with enable_fp_fusion=False (no a*b + c
# contracted into an FMA) and only correctly rounded instructions (tl.div_rn, tl.sqrt_rn), which the gate
# checks in the PTX of the launches listed. Otherwise the bound its tests hold the interpreter to is what
# holds on hardware too, for the reason given. (Triton's defaults on NVIDIA: FMA contraction on, `/` as
# div.full.f32 (2 ulp), tl.exp as ex2.approx; the interpreter computes all of it exactly in numpy.)
EXACT_ON_GPU = {
    "_rope_write_kv_kernel": "exact without head norms (launch 'rope_write_kv'); with Qwen3's q/k norms, the "
                             "reference's roundings but for the order of the norm's sum",
    "_rms_norm_kernel": "the reference's roundings (correctly rounded sqrt and divisions, no FMA) but for the "
                        "order of the row's sum",
    "_silu_mul_kernel": "within the fused tests' tolerance: exp is ex2.approx (about 2 ulp)",
    "_decode_kernel": "within the attention tests' tolerance: exp2 approximations, tensor-core (or FMA) dot "
                      "products in another order",
    "_merge_splits_kernel": "within the attention tests' tolerance (exp approximations)",
    "_prefill_kernel": "within the attention tests' tolerance (as _decode_kernel)",
    "_scan_kernel": "logits / temperature correctly rounded (tl.div_rn): the reference's scaled logits, so greedy "
                    "tokens are the reference's; exp for the softmax sums is approximate",
    "_finish_kernel": "thresholds and the draw on approximate exp/log: a sampled token is the reference's "
                      "unless the draw falls within a few ulp of a CDF boundary; logprobs within 1e-5",
}
# Plan launches whose every variant must use only correctly rounded instructions: no contracted FMA, no
# approximate instruction (what makes the kernels above "exact" or "but for the order of the sum").
CORRECTLY_ROUNDED_LAUNCHES = ("rope_write_kv", "rope_write_kv + q/k norm", "rms_norm", "rms_norm + residual")
_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")
_APPROX = re.compile(r"\.approx\.|\bdiv\.full\.f32\b")


# -- the stand-in driver --------------------------------------------------------------------


class _NoLaunch:
    """Takes the place of Triton's CUDA launcher: accepts a launch and does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class _Utils:
    def __init__(self, arch: int):
        limits = SM_LIMITS[arch]
        self.props = {"max_shared_mem": limits["smem_per_program"], "multiprocessor_count": limits["sms"],
                      "max_num_regs": limits["regs"], "warpSize": 32}

    def get_device_properties(self, device):
        return self.props

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded; the real
        # register figures come from ptxas (resource_usage).
        return None, None, 0, 0, 1024


class StandInDriver(DriverBase):
    """An active Triton driver for a GPU that is not there: compiles for `arch`, launches nothing."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _NoLaunch

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver cannot time kernels")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0


def jit_kernels() -> dict[str, JITFunction]:
    """Every launched @triton.jit kernel of kernels/ by name (helpers called from kernels excluded)."""
    found = {}
    for module in KERNEL_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[name] = obj
    return found


@contextlib.contextmanager
def stand_in_driver(arch: int) -> Iterator[None]:
    """Make Triton compile for `arch` with no GPU; the kernels' per-device caches are emptied on
    the way in and out, since they remember the target they were first used with."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile")
    kernels = jit_kernels().values()
    for fn in kernels:
        fn.device_caches.clear()
    previous = driver._active  # None on a machine with no GPU (reset_active would raise there)
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = previous
        for fn in kernels:
            fn.device_caches.clear()


# -- the launch plan -------------------------------------------------------------------------


def launch_plan(shape: ModelShape, dtype: torch.dtype, device: torch.device | str = "cpu",
                num_seqs: int = 4, context_len: int = 40) -> list[tuple[str, Callable[[], object]]]:
    """(label, thunk) for every kernel launch the engine makes on a model of this shape.

    Each thunk calls a public launcher of kernels/ with tensors of the model's shapes, dtype and
    strides (small batches: the batch size is a grid dimension, not a compile-time value). Every
    compile-time variant the engine can reach is listed: split-KV off and on, the residual and
    plain RMSNorm, the sampler with one chunk per row and with several, each with and without the token
    confidence. `num_seqs` and
    `context_len` change only runtime values (tests use them to show that no launch recompiles).
    """
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.block_size
    n, ctx = num_seqs, context_len
    blocks_per_seq = -(-ctx // bs)
    num_blocks = n * blocks_per_seq + 1

    def rand(*size, dt=dtype):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dt)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    k_cache, v_cache = rand(num_blocks, bs, hkv, d), rand(num_blocks, bs, hkv, d)
    tables = i32([[1 + i * blocks_per_seq + j for j in range(blocks_per_seq)] for i in range(n)])
    ctx_lens = i32([ctx - i % 3 for i in range(n)])
    slots = torch.arange(n, dtype=torch.long, device=device) * bs
    prompt = max(1, ctx // 2)
    cu = i32([i * prompt for i in range(n + 1)])
    scale = d**-0.5
    logits = rand(n, shape.vocab)
    params, state = budget_state.sampling_batch(n, temperature=0.7, top_k=50, top_p=0.95, device=device)

    def sample(chunks, confidence=False):
        return lambda: sample_with_budget.sample_with_budget(logits, params, state, num_chunks=chunks,
                                                             confidence=confidence)

    def rope(norms):
        qkv = rand(n, (hq + 2 * hkv) * d)  # the packed QKV output: q, k, v are views of it
        q, k, v = (t.view(n, -1, d) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
        table = torch.randn(2 * ctx, d, generator=gen).to(device)  # fp32 cos/sin tables
        weights = (rand(d), rand(d), 1e-6) if norms else ()
        return lambda: rope_write_kv.rope_write_kv(q, k, v, slots, table, table, k_cache, v_cache, slots, *weights)

    return [
        ("rope_write_kv", rope(False)),
        ("rope_write_kv + q/k norm", rope(True)),
        ("paged_decode_attention", lambda: paged_decode_attention.paged_decode_attention(
            rand(n, hq, d), k_cache, v_cache, tables, ctx_lens, scale, num_splits=1)),
        ("paged_decode_attention split-KV", lambda: paged_decode_attention.paged_decode_attention(
            rand(n, hq, d), k_cache, v_cache, tables, ctx_lens, scale, num_splits=4)),
        ("paged_prefill_attention", lambda: paged_prefill_attention.paged_prefill_attention(
            rand(n * prompt, hq, d), k_cache, v_cache, tables, cu, ctx_lens, scale, max_new_tokens=prompt)),
        ("rms_norm", lambda: rms_norm.rms_norm(rand(n, shape.hidden), rand(shape.hidden), 1e-6)),
        ("rms_norm + residual", lambda: rms_norm.rms_norm(rand(n, shape.hidden), rand(shape.hidden), 1e-6,
                                                          residual=rand(n, shape.hidden))),
        ("silu_mul", lambda: silu_mul.silu_mul(rand(n, shape.intermediate), rand(n, shape.intermediate))),
        ("sample_with_budget", sample(1)),
        ("sample_with_budget chunked", sample(4)),
        ("sample_with_budget + confidence", sample(1, confidence=True)),
        ("sample_with_budget chunked + confidence", sample(4, confidence=True)),
    ]


# -- compiling and reading the result ---------------------------------------------------------


@dataclass
class Variant:
    """One compiled kernel variant and its resource use."""

    kernel: str  # the @triton.jit function's name
    arch: int
    dtype: str  # the dtype of the plan that first compiled it
    shape: str  # the model shape of that plan
    launch: str  # the plan label
    compiled: object  # triton CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin)
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0  # bytes of shared memory Triton allocated (metadata)
    fma: int = 0  # contracted fp32 multiply-adds in the PTX
    approx: int = 0  # approximate fp32 instructions in the PTX (ex2/lg2/rcp/sqrt .approx, div.full)

    @property
    def num_warps(self) -> int:
        return self.compiled.metadata.num_warps

    @property
    def num_stages(self) -> int:
        return self.compiled.metadata.num_stages

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS_LINE = re.compile(r"Used (\d+) registers")


def resource_usage(ptx: str, arch: int) -> dict[str, int]:
    """ptxas -v on the kernel's PTX, with the flags Triton compiles it with: registers, spill
    stores/loads (bytes) and stack frame (bytes)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                               str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    log = proc.stderr
    regs = _PTXAS_LINE.search(log)

    def num(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(registers=int(regs.group(1)) if regs else 0,
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                stack=num(r"(\d+) bytes stack frame"))


def _each_launch(shapes, dtypes, **plan_kwargs):
    """Run every plan's launches; yields (shape, dtype, label) after each."""
    for shape in shapes:
        for dtype in dtypes:
            for label, thunk in launch_plan(shape, dtype, **plan_kwargs):
                thunk()
                yield shape, dtype, label


def _compiled(fn: JITFunction) -> list:
    """The variants a kernel has compiled on the (stand-in) device 0."""
    return list(fn.device_caches[0][0].values()) if fn.device_caches else []


def compile_plans(arch: int, shapes=SHAPES, dtypes=DTYPES, **plan_kwargs) -> list[Variant]:
    """Run every plan under the stand-in driver for `arch`; each new compiled variant is
    returned once, labelled with the first plan that reached it. A compile error propagates."""
    variants: list[Variant] = []
    seen: set[int] = set()
    with stand_in_driver(arch):
        kernels = jit_kernels()
        for shape, dtype, label in _each_launch(shapes, dtypes, **plan_kwargs):
            for name, fn in kernels.items():
                for compiled in _compiled(fn):
                    if id(compiled) not in seen:
                        seen.add(id(compiled))
                        variants.append(Variant(kernel=name, arch=arch, dtype=str(dtype).replace("torch.", ""),
                                                shape=shape.name, launch=label, compiled=compiled,
                                                shared=compiled.metadata.shared))
    for v in variants:
        ptx = v.compiled.asm["ptx"]
        for key, value in resource_usage(ptx, arch).items():
            setattr(v, key, value)
        v.fma, v.approx = len(_FMA.findall(ptx)), len(_APPROX.findall(ptx))
    return variants


def inexact(variants: list[Variant]) -> list[Variant]:
    """The variants of CORRECTLY_ROUNDED_LAUNCHES whose PTX has a contracted FMA or an approximate instruction."""
    return [v for v in variants if v.launch in CORRECTLY_ROUNDED_LAUNCHES and (v.fma or v.approx)]


def variant_counts(arch: int, **plan_kwargs) -> dict[str, int]:
    """How many compiled variants each kernel needs for every plan (shapes x dtypes)."""
    with stand_in_driver(arch):
        for _ in _each_launch(SHAPES, DTYPES, **plan_kwargs):
            pass
        return {name: len(_compiled(fn)) for name, fn in jit_kernels().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m elastic_decode.kernels.aot",
        description="Compile every Triton kernel of elastic_decode for a GPU target without a GPU "
                    "(the engine's launch plans for the reference Qwen2.5-1.5B and SmolLM2-135M shapes, "
                    "bf16/fp16/fp32) and print registers, spills and shared memory per variant.")
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append",
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="exit 1 if any variant spills registers (every target and dtype: the CI gate's rule), "
                             "or a launch promised correctly rounded (CORRECTLY_ROUNDED_LAUNCHES) has an FMA or an "
                             "approximate instruction")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant instead of a table")
    args = parser.parse_args(argv)
    failed = False
    for arch in args.arch or ARCHS:
        variants = compile_plans(arch)
        failed |= args.fail_on_spill and (any(v.spills for v in variants) or bool(inexact(variants)))
        bad = {id(v) for v in inexact(variants)}
        for v in variants:
            if args.json:
                print(json.dumps(dict(kernel=v.kernel, arch=arch, dtype=v.dtype, shape=v.shape, launch=v.launch,
                                      registers=v.registers, spill_stores=v.spill_stores, spill_loads=v.spill_loads,
                                      shared=v.shared, num_warps=v.num_warps, fma=v.fma, approx=v.approx)))
            else:
                print(f"sm_{arch} {v.kernel:32s} {v.dtype:8s} {v.shape:14s} regs {v.registers:3d} "
                      f"spill {v.spill_stores}/{v.spill_loads} B smem {v.shared:6d} B warps {v.num_warps} "
                      f"stages {v.num_stages} fma {v.fma:4d} approx {v.approx:3d}  [{v.launch}]"
                      f"{'  SPILLS' if v.spills else ''}{'  NOT EXACT' if id(v) in bad else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
