"""Static resource report of every Triton kernel, compiled for sm_80 and sm_90 without a GPU.

For each compiled variant (kernel x target x dtype x model shape, through the engine's launch
plans of kernels/aot.py): registers and spills (ptxas -v), shared memory, num_warps / num_stages,
theoretical occupancy and what limits it, and from the SASS (cuobjdump -sass) of the main loop:
its instruction count, whether its global loads are 128-bit (LDG.E.128, or LDGSTS.*.128 for
cp.async), and whether it uses tensor cores (HMMA / HGMMA). For the sampler it also estimates
warp-instructions per logits row at the benchmark shape.

Everything here is static: no kernel runs. It is the evidence a reader without a GPU can check
(benchmarks/RESULTS.md keeps the table).

    python benchmarks/gpu_static.py                    # markdown table on stdout
    python benchmarks/gpu_static.py --out report.md    # also written to a file
    python benchmarks/gpu_static.py --arch 90 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret

import torch  # noqa: E402

from elastic_decode.kernels import aot  # noqa: E402

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")


@dataclass
class Loop:
    start: int  # address of the first instruction (branch target)
    end: int  # address of the backward branch
    instructions: list[str] = field(default_factory=list)
    depth: int = 0  # nesting depth (0 = outermost)
    innermost: bool = True

    @property
    def size(self) -> int:
        return len(self.instructions)

    def count(self, pattern: str) -> int:
        return sum(1 for i in self.instructions if re.search(pattern, i))

    @property
    def global_loads(self) -> int:
        return self.count(r"\bLDG(STS)?\b|\bLDG(STS)?\.")

    @property
    def wide_loads(self) -> int:
        return self.count(r"\bLDG(STS)?\.[A-Z.]*128\b")

    @property
    def mma(self) -> int:
        return self.count(r"\bH(G)?MMA\b|\bH(G)?MMA\.")


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([aot._tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _INSTR.finditer(text)]


def loops(code: list[tuple[int, str]]) -> list[Loop]:
    """Loops as backward branches: [target, branch], nested by containment."""
    found = []
    for addr, ins in code:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) <= addr:
            start = int(m.group(1), 16)
            found.append(Loop(start, addr, [i for a, i in code if start <= a <= addr]))
    for loop in found:
        outer = [o for o in found if o is not loop and o.start <= loop.start and loop.end <= o.end]
        loop.depth = len(outer)
        loop.innermost = not any(i is not loop and loop.start <= i.start and i.end <= loop.end for i in found)
    return found


def main_loop(found: list[Loop], code: list[tuple[int, str]]) -> Loop:
    """The innermost loop with the most global loads (ties: the longest); a kernel with no such
    loop (one tile per program) is its own body."""
    inner = [lp for lp in found if lp.innermost and lp.global_loads]
    if inner:
        return max(inner, key=lambda lp: (lp.global_loads, lp.size))
    return Loop(code[0][0], code[-1][0], [i for _, i in code], innermost=False)


def occupancy(regs: int, shared: int, warps: int, arch: int) -> tuple[int, str]:
    """Resident warps per SM (theoretical) and the limiting resource."""
    lim = aot.SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocation granularity: 256 per warp
    by = {
        "warps": lim["warps"] // warps,
        "programs": lim["programs"],
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "shared": lim["smem"] // (shared + 1024) if shared else lim["programs"],  # 1 KB reserved per program
    }
    limiter = min(by, key=by.get)
    return by[limiter] * warps, limiter


def sampler_row_estimate(found: list[Loop], vocab: int, block_v: int, warps: int) -> int:
    """Warp-instructions per logits row: each innermost loop with a global load is taken as one
    pass over the row (ceil(vocab / block_v) iterations), times 8 when it sits inside another
    loop (the radix search's passes). A static estimate of the common path, not a measurement."""
    trips = math.ceil(vocab / block_v)
    total = 0
    for lp in found:
        if lp.innermost and lp.global_loads:
            total += lp.size * trips * (8 if lp.depth else 1)
    return total * warps


def report(archs, dtypes, shapes) -> list[dict]:
    rows = []
    for arch in archs:
        for v in aot.compile_plans(arch, shapes=shapes, dtypes=dtypes):
            code = sass(v.compiled.asm["cubin"])
            found = loops(code)
            main = main_loop(found, code)
            resident, limiter = occupancy(v.registers, v.shared, v.num_warps, arch)
            row = dict(kernel=v.kernel, arch=f"sm_{arch}", dtype=v.dtype, shape=v.shape, launch=v.launch,
                       regs=v.registers, spills=f"{v.spill_stores}/{v.spill_loads}", smem=v.shared,
                       warps=v.num_warps, stages=v.num_stages, resident_warps=resident,
                       per_scheduler=resident / 4, limiter=limiter, sass=len(code), loops=len(found),
                       loop_sass=main.size if main.innermost else f"{main.size} (no loop)",
                       wide=f"{main.wide_loads}/{main.global_loads}", mma=main.mma, loop_list=found)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | target | dtype | shape | launch | regs | spill st/ld B | smem B | warps/stages "
            "| resident warps/SM (per scheduler) | limiter | main loop SASS | 128-bit / all global loads in it "
            "| MMA in it |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['shape']} | {r['launch']} | {r['regs']} "
                     f"| {r['spills']} | {r['smem']} | {r['warps']}/{r['stages']} | {r['resident_warps']} "
                     f"({r['per_scheduler']:g}) | {r['limiter']} | {r['loop_sass']} | {r['wide']} | {r['mma']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, choices=aot.ARCHS, action="append", help="80 and/or 90 (default both)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], action="append",
                        help="default: all three")
    parser.add_argument("--shape", choices=[s.name for s in aot.SHAPES], action="append", help="default: both")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else aot.DTYPES
    shapes = tuple(s for s in aot.SHAPES if not args.shape or s.name in args.shape)
    rows = report(args.arch or aot.ARCHS, dtypes, shapes)
    table = markdown(rows)
    print(table)
    for r in rows:
        if r["kernel"].startswith("_sample") and r["shape"] == aot.QWEN25_1_5B.name:
            est = sampler_row_estimate(r["loop_list"], aot.QWEN25_1_5B.vocab, aot.sample_with_budget.BLOCK_V,
                                       r["warps"])
            sizes = ", ".join(f"{lp.size}{'*' if lp.global_loads else ''}@{lp.depth}" for lp in r["loop_list"])
            print(f"\n{r['kernel']} {r['arch']} {r['dtype']} [{r['launch']}]: loops (SASS size, * = global load, "
                  f"@nesting) {sizes}; estimated {est:,} warp-instructions per {aot.QWEN25_1_5B.vocab}-wide row")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
