"""What the command lines share (generate, eval, serve, train): the argument parser that reports a bad
argument in one line, budget values, and the engine flags with their choices taken from the constants
the engine checks against (config.py), so a flag and the engine cannot disagree."""
from __future__ import annotations

import argparse

from .config import BACKENDS, DTYPES, QUANTIZATIONS


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line for a bad argument (argparse's default also prints the whole usage)."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_budget(text: str) -> int | None:
    """A budget flag's value: a non-negative integer, or 'none' for no budget."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer or 'none', got {text!r}")
    return value


def add_engine_arguments(group, backend: bool = False) -> None:
    """The engine flags every CLI that builds an LLM shares (generate, eval, serve; `backend`: also --backend)."""
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="weights and KV cache; auto: bfloat16 on a CPU with AVX512-BF16 or AMX, else float32 "
                       "on CPU (float32 with --quantization int4), the checkpoint's 16-bit dtype on CUDA; float32 is "
                       "exact parity with HF on the reference and cpu backends [auto]")
    group.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                       help="weight-only quantization: int4 keeps the decoder layers' GEMM weights in 4 bits and "
                            "the LM head's in 8 (groups of 32, GGUF's Q4_1 / Q8_0; the embedded Q4_1 model keeps its "
                            "own weights), activations in float32; CPU backend only; faster at batch 1, slower at "
                            "batch 16 (default: none, the weights in --dtype)")
    group.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    if backend:
        group.add_argument("--backend", default=None, choices=BACKENDS,
                           help="auto (Triton on CUDA, the C++ kernels on CPU) | triton | cpu | reference "
                                "(default: $ELASTIC_DECODE_BACKEND, else auto)")
    group.add_argument("--num-scheduler-steps", type=int, default=1,
                       help="decode steps run on the device between host syncs; same output for any value (default 1)")
    graphs = group.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", action="store_const", const=True, default=None,
                        help="ask for CUDA graphs of the decode step, an error where they cannot run (default: on "
                             "where they can: CUDA, Triton kernels, one rank; a capture that fails at start-up "
                             "falls back to eager decoding with a warning)")
    graphs.add_argument("--enforce-eager", action="store_true",
                        help="never capture CUDA graphs: decode eagerly")
    group.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="split the model over this many GPUs (or CPU processes), Megatron-style (default 1)")
    group.add_argument("--data-parallel-size", type=int, default=1,
                       help="run this many engine replicas (each --tensor-parallel-size GPUs) and deal the prompts "
                            "among them (default 1)")


def engine_kwargs(args, **extra) -> dict:
    """The LLM arguments of the engine flags (add_engine_arguments) and any the command adds itself."""
    kwargs = dict(dtype=args.dtype, quantization=args.quantization, device=args.device,
                  num_scheduler_steps=args.num_scheduler_steps, cuda_graphs=args.cuda_graphs,
                  enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    if getattr(args, "backend", None) is not None:
        kwargs["backend"] = args.backend
    return {**kwargs, **extra}


def add_early_stop_arguments(group) -> None:
    """The early-exit flags eval and generate share (SamplingParams' knobs)."""
    group.add_argument("--confidence-window", type=int, default=2048,
                       help="tokens per group confidence (DeepConf's sliding window; default 2048)")
    group.add_argument("--deepconf-warmup", type=int, default=16,
                       help="DeepConf: traces of the n that run whole and set the threshold (default 16)")
    group.add_argument("--deepconf-keep", type=float, default=0.1,
                       help="DeepConf: the threshold keeps this share of warm-up-like traces, and the filtered vote "
                            "this share of traces (0.1: DeepConf-low, 0.9: DeepConf-high; default 0.1)")
    group.add_argument("--deepconf-action", choices=("stop", "answer"), default="stop",
                       help="DeepConf: a trace below the threshold stops (default), or has its thinking ended by the "
                            "forced marker so it still answers")
    group.add_argument("--deer-threshold", type=float, default=0.95,
                       help="DEER: a probe answer this confident (mean token probability) ends thinking (default 0.95)")
    group.add_argument("--deer-answer-prefix", default=None,
                       help="DEER: what a probe writes after the end-of-thinking marker, opening the answer's box "
                            "(default '**Final Answer**\\n\\boxed{'; a model trained on another format answers "
                            "surer in its own, e.g. 'The answer is \\boxed{')")
    group.add_argument("--deer-transitions", type=_strings, default=None,
                       help="DEER: comma-separated strings that mark a thinking transition, where a probe answers "
                            "(default: the model family's: 'Wait' and 'Alternatively' for Qwen-based reasoning "
                            "models, else 'Wait' and paragraph breaks)")


def early_stop_params(name: str, args) -> dict:
    """SamplingParams' early-exit arguments for one of EARLY_STOPS."""
    if name == "none":
        return {"confidence_window": args.confidence_window}
    return dict(early_stop=name, confidence_window=args.confidence_window, deepconf_warmup=args.deepconf_warmup,
                deepconf_keep=args.deepconf_keep, deepconf_action=args.deepconf_action,
                deer_threshold=args.deer_threshold, deer_transitions=args.deer_transitions,
                deer_answer_prefix=args.deer_answer_prefix)


def warn_idle_deepconf(early_stops, n: int, warmup: int) -> None:
    """DeepConf with n at most its warm-up never stops a trace (every trace is a warm-up trace): say so."""
    if "deepconf" in early_stops and n <= warmup:
        import sys

        print(f"warning: -n {n} is not more than --deepconf-warmup {warmup}: every trace is a warm-up trace and "
              "DeepConf stops none (its vote is still weighted by confidence)", file=sys.stderr)


def _strings(text: str) -> tuple[str, ...]:
    parts = tuple(part for part in text.split(",") if part)
    if not parts:
        raise argparse.ArgumentTypeError("give at least one string")
    return parts
