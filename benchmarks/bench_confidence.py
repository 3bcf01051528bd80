"""What the token confidence adds to a sampling step, measured where it runs here (the CPU backend's sampler),
against one read of the logits row (a row max over the batch) in the same run: the confidence alone (a top-k and
a logsumexp over the row, what the step adds) and the whole step without and with it (the difference is within
the step's own noise on a shared 2-core machine).

    python benchmarks/bench_confidence.py                    # SmolLM2's vocabulary, batches 1, 16, 64
    python benchmarks/bench_confidence.py --vocab 151936 --batches 16

The Triton sampler computes it in its one streaming pass (a kernel variant of its own; docs/confidence.md): its
cost there is static here (registers, reads per row: `python -m elastic_decode.kernels.aot`,
`benchmarks/sampler_reads.py --confidence`), not a time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from elastic_decode.kernels import cpu as cpu_ops
from elastic_decode.kernels import reference, sampling_batch


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=49152, help="row length (default 49152, SmolLM2's)")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (default 1,16,64)")
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per figure (default 30)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}, fp32 logits, "
          "T 0.6 top-p 0.95 (the eval's settings)")
    print("| batch | one read (row max) ms | confidence alone ms | / one read | sampler ms | sampler + confidence ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for n in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(n, args.vocab) * 3

        def step(confidence: bool):
            params, state = sampling_batch(n, temperature=0.6, top_p=0.95, seeds=range(n), generated=1)
            return lambda: cpu_ops.sample_with_budget(logits, params, state, confidence=confidence)

        read = median_ms(lambda: logits.amax(dim=-1), args.repeat)
        alone = median_ms(lambda: reference.token_confidence(logits), args.repeat)  # what the step adds
        plain = median_ms(step(False), args.repeat)
        with_conf = median_ms(step(True), args.repeat)
        print(f"| {n} | {read:.3f} | {alone:.3f} | {alone / read:.1f}x | {plain:.3f} | {with_conf:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
