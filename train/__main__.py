"""GRPO training with budget-constrained rollouts (Elastic Reasoning), SFT and distillation.

    python -m elastic_decode.train --task arithmetic:1 --steps 30 --think-budget 32 --solution-budget 32
    python -m elastic_decode.train --task arithmetic:1 --steps 30 --async-rollouts --max-staleness 1 \
        --think-budget-schedule choice:16,32,64 --report-to tensorboard
    python -m elastic_decode.train --mode sft --sft-data traces.jsonl --epochs 2 --output-dir runs/sft
    python -m elastic_decode.train --mode distill --teacher runs/big/checkpoint-40 --task arithmetic:2 \
        --distill-prompts 256 --group-size 4 --think-budget 256 --output-dir runs/distill
    python -m elastic_decode.train --config run.json --learning-rate 2e-6
    python -m elastic_decode.train --config run.json --resume runs/grpo/checkpoint-10

Every rollout thinks for at most --think-budget tokens (the end-of-thinking marker is forced
there) and answers in at most --solution-budget tokens; the reward is 1 for a correct answer in
\\boxed{} after the marker plus --format-reward-weight for any boxed answer. Per step one JSONL
row of metrics goes to OUTPUT_DIR/metrics.jsonl; checkpoints (HF format, loadable by the engine)
go to OUTPUT_DIR/checkpoint-STEP; OUTPUT_DIR/training.png plots the run at the end.
--mode sft trains on JSONL traces with the loss on completion tokens only; --mode distill first
samples traces from --teacher on --task, keeps only the verified-correct ones, then does SFT.
Flags override --config; errors in the input are reported as one line (exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from elastic_decode.errors import ElasticDecodeError
from elastic_decode.cli import OneLineErrorParser
from elastic_decode.utils.outpaths import check_output_dir

from .config import GRPOConfig

_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m elastic_decode.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--config", help="JSON file of GRPOConfig fields (flags given here override it)")
    run.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from one of its checkpoint directories")
    run.add_argument("--overwrite", action="store_true", help="start over in an output dir that holds a run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    fields = p.add_argument_group("GRPOConfig fields (defaults in brackets)")
    for f in dataclasses.fields(GRPOConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} [{f.default}]".replace("%", "%%")
        if f.type == "bool":
            fields.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        else:
            fields.add_argument(flag, dest=f.name, type=_TYPES[f.type], default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if hasattr(args, f.name)}
    try:
        base = GRPOConfig.from_json(args.config).to_dict() if args.config else {}
        config = GRPOConfig.from_dict({**base, **overrides})
        check_output_dir(Path(config.output_dir), "--output-dir")  # before seconds of model loading
        # Imported after validation: importing transformers takes seconds.
        if config.mode == "grpo":
            from .trainer import GRPOTrainer

            trainer = GRPOTrainer(config, resume_from=args.resume, overwrite=args.overwrite,
                                  use_tqdm=not args.no_progress)
        else:
            if args.resume:
                raise ValueError(f"--resume continues GRPO runs only; mode {config.mode} starts over")
            from .sft import SFTTrainer

            trainer = SFTTrainer(config, overwrite=args.overwrite, use_tqdm=not args.no_progress)
    except ValueError as e:  # settings, task, dataset, model path: the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except ElasticDecodeError as e:  # e.g. a dataset prompt longer than the model's context, nothing to distill
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
