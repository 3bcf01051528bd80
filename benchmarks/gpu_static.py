"""Static resource report of every Triton kernel, compiled for sm_80 and sm_90 without a GPU.

For each compiled variant (kernel x target x dtype x model shape, through the engine's launch
plans of kernels/aot.py): registers and spills (ptxas -v), shared memory, num_warps / num_stages,
theoretical occupancy and what limits it, and from the SASS (cuobjdump -sass) of the main loop:
its instruction count, whether its global loads are 128-bit (LDG.E.128, or LDGSTS.*.128 for
cp.async), and whether it uses tensor cores (HMMA / HGMMA). For the sampler it also estimates
warp-instructions per logits row at the reference vocabulary.

Everything here is static: no kernel runs. It is the evidence a reader without a GPU can check
(benchmarks/RESULTS.md keeps the table).

    python benchmarks/gpu_static.py                    # markdown table on stdout
    python benchmarks/gpu_static.py --out report.md    # also written to a file
    python benchmarks/gpu_static.py --arch 90 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import inspect
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
import triton  # noqa: E402

from elastic_decode.kernels import aot  # noqa: E402

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+|\.L_x_\d+)")


# Helpers whose code is not on every iteration of the loop that calls them (the sampler's scan
# appends candidates only on tiles that have some, and compacts its buffer only when it fills).
RARE_HELPERS = {"_scan_kernel": ("_append", "_compact", "_buffer_search", "_segment_sums")}


@dataclass
class Loop:
    start: int  # address of the first instruction (branch target)
    end: int  # address of the backward branch
    body: list[tuple[int, str, int]] = field(default_factory=list)  # (address, instruction, source line)
    depth: int = 0  # nesting depth (0 = outermost)
    innermost: bool = True
    own: list[tuple[int, str, int]] = field(default_factory=list)  # the body outside nested loops
    whole: bool = False  # not a loop: the whole kernel (no streaming loop)

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def instructions(self) -> list[str]:
        return [i for _, i, _ in self.own]

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


def load_bytes(instruction: str) -> int:
    """Bytes per thread of a global load instruction (0 if not one)."""
    if not re.search(r"\bLDG(STS)?\b|\bLDG(STS)?\.", instruction):
        return 0
    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", instruction)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[width.group(1)] if width else 4


def sass(cubin: bytes, with_lines: bool = False) -> list:
    """(address, instruction) of the kernel's SASS; with_lines: (address, instruction, source line)
    where the line is the nearest preceding line of kernels/ (code Triton's library functions emit,
    such as a reduction, is attributed to the kernel line that called them)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([aot._tool("nvdisasm"), "-c", "-gi", f.name], capture_output=True, text=True,
                              check=True).stdout
    code, line, pending, labels = [], 0, [], {}
    for raw in text.splitlines():
        found = _LINE.search(raw)
        if found:
            if "/kernels/" in found.group(1).replace("\\", "/"):
                line = int(found.group(2))
            continue
        label = _LABEL.match(raw.strip())
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.search(raw)
        if m:
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            code.append((addr, m.group(2).strip(), line))
    # Branch targets as addresses (nvdisasm names them by label).
    code = [(a, re.sub(r"`?\(?(\.L_x_\d+)\)?", lambda t: hex(labels.get(t.group(1), 0)), i), ln)
            for a, i, ln in code]
    return code if with_lines else [(a, i) for a, i, _ in code]


def loops(code: list[tuple[int, str, int]]) -> list[Loop]:
    """Loops as backward branches: [target, branch], nested by containment."""
    found = []
    for addr, ins, _ in code:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) <= addr:
            start = int(m.group(1), 16)
            found.append(Loop(start, addr, [c for c in code if start <= c[0] <= addr]))
    for loop in found:
        outer = [o for o in found if o is not loop and o.start <= loop.start and loop.end <= o.end]
        inner = [i for i in found if i is not loop and loop.start <= i.start and i.end <= loop.end]
        loop.depth = len(outer)
        loop.innermost = not inner
        loop.own = [c for c in loop.body if not any(i.start <= c[0] <= i.end for i in inner)]
    return found


def main_loop(found: list[Loop], code: list[tuple[int, str, int]]) -> Loop:
    """The outermost loop whose own body (nested loops aside) holds the kernel's widest global
    load: the streaming loop of every kernel here. A kernel with no such loop (one tile per
    program) is its own body (`whole`)."""
    widest = max((load_bytes(i) for _, i, _ in code), default=0)
    holding = [lp for lp in found if any(load_bytes(i) == widest for i in lp.instructions)]
    if widest and holding:
        return min(holding, key=lambda lp: (lp.depth, -lp.global_loads))
    return Loop(code[0][0], code[-1][0], list(code), innermost=False, own=list(code), whole=True)


def helper_lines(names: tuple[str, ...]) -> set[int]:
    """Source lines of the named @triton.jit helpers of kernels/sample_with_budget.py."""
    lines = set()
    for name in names:
        fn = getattr(aot.sample_with_budget, name).fn
        source, first = inspect.getsourcelines(fn)
        lines.update(range(first, first + len(source)))
    return lines


def every_iteration(kernel: str, loop: Loop) -> int:
    """SASS instructions of the loop's own body less the rare helpers' (by source line)."""
    rare = helper_lines(RARE_HELPERS.get(kernel, ()))
    return sum(1 for _, _, line in loop.own if line not in rare)


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


def report(archs, dtypes, shapes) -> list[dict]:
    rows = []
    for arch in archs:
        for v in aot.compile_plans(arch, shapes=shapes, dtypes=dtypes):
            code = sass(v.compiled.asm["cubin"], with_lines=True)
            found = loops(code)
            main = main_loop(found, code)
            resident, limiter = occupancy(v.registers, v.shared, v.num_warps, arch)
            widest = max((load_bytes(i) for i in main.instructions), default=0)
            rows.append(dict(
                kernel=v.kernel, arch=f"sm_{arch}", dtype=v.dtype, shape=v.shape, launch=v.launch,
                regs=v.registers, spills=f"{v.spill_stores}/{v.spill_loads}", smem=v.shared, warps=v.num_warps,
                stages=v.num_stages, resident_warps=resident, per_scheduler=resident / 4, limiter=limiter,
                loop_sass=f"{len(main.own)} (no loop)" if main.whole else len(main.own),
                every=every_iteration(v.kernel, main), widest=widest, wide=f"{main.wide_loads}/{main.global_loads}",
                mma=main.mma, loop=main))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | target | dtype | shape | launch | regs | spill st/ld B | smem B | warps/stages "
            "| resident warps/SM (per scheduler) | limiter | main loop SASS (every iteration) "
            "| widest load B/thread | 128-bit / all global loads in loop | MMA in loop |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        loop = r["loop_sass"] if r["loop"].whole else f"{r['loop_sass']} ({r['every']})"
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['shape']} | {r['launch']} | {r['regs']} "
                     f"| {r['spills']} | {r['smem']} | {r['warps']}/{r['stages']} | {r['resident_warps']} "
                     f"({r['per_scheduler']:g}) | {r['limiter']} | {loop} | {r['widest']} | {r['wide']} | {r['mma']} |")
    return "\n".join(lines)


def sampler_per_row(rows: list[dict]) -> list[str]:
    """The scan's static cost of one logits row at the reference vocabulary: every-iteration SASS x
    tiles per row x warps (warp-instructions; the append runs on tiles with candidates, the
    compaction when the buffer fills: both excluded, both reported)."""
    out = []
    tiles = math.ceil(aot.QWEN25_1_5B.vocab / aot.sample_with_budget.BLOCK_V)
    for r in rows:
        if r["kernel"] == "_scan_kernel" and r["shape"] == aot.QWEN25_1_5B.name:
            loop = r["loop"]
            append = sum(1 for _, _, line in loop.own if line in helper_lines(("_append",)))
            per_row = r["every"] * tiles * r["warps"]
            out.append(f"{r['arch']} {r['dtype']} [{r['launch']}]: {r['every']} SASS instructions per "
                       f"{aot.sample_with_budget.BLOCK_V}-token tile on every tile, {append} more on tiles with "
                       f"candidates; {tiles} tiles x {r['warps']} warps = {per_row:,} warp-instructions per "
                       f"{aot.QWEN25_1_5B.vocab}-wide row (static estimate)")
    return out


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
    notes = sampler_per_row(rows)
    print(table)
    print("\n".join(["", *notes]))
    if args.out:
        ptxas = subprocess.run([aot._tool("ptxas"), "--version"], capture_output=True, text=True).stdout
        version = ptxas.strip().splitlines()[-1] if ptxas.strip() else "ptxas ?"
        head = (f"# Static resource report of the Triton kernels\n\nWritten by `make gpu-report` "
                f"(benchmarks/gpu_static.py): triton {triton.__version__}, {version}. Compiled for the targets "
                "below with no GPU (kernels/aot.py); nothing ran. Main loop SASS: the streaming loop without "
                "nested loops, and in brackets without the sampler's rarely taken helpers.\n\n")
        args.out.write_text(head + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
