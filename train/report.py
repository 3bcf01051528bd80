"""Where a trainer user looks besides metrics.jsonl and the plot (`--report-to`): TensorBoard through
`torch.utils.tensorboard` (needs the `tensorboard` package) and Weights & Biases (when `wandb` is
installed and logged in). Each step's metrics row is logged under its step; rank 0 alone reports."""
from __future__ import annotations

import importlib.util
from pathlib import Path

TARGETS = ("none", "tensorboard", "wandb")


def parse_targets(text: str) -> tuple[str, ...]:
    """`none`, or a comma list of tensorboard and wandb; ValueError otherwise."""
    targets = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not targets or any(t not in TARGETS for t in targets) or ("none" in targets and len(targets) > 1):
        raise ValueError(f"report_to must be none or a comma list of tensorboard, wandb; got {text!r}")
    return () if targets == ("none",) else targets


def check_installed(targets: tuple[str, ...]) -> None:
    """Before a run starts: each target's package is importable (a one-line error otherwise)."""
    for target in targets:
        if importlib.util.find_spec(target) is None:
            raise ValueError(f"--report-to {target} needs the {target} package: pip install {target}")


class Reporter:
    def __init__(self, targets: tuple[str, ...], output_dir: Path, config: dict, resume_step: int = 0):
        self.writers = []
        check_installed(targets)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events of the steps it redoes
            writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                   purge_step=resume_step + 1 if resume_step else None)
            self.writers.append(("tensorboard", writer))
        if "wandb" in targets:
            import wandb

            id_file = output_dir / "wandb_run_id"  # a resumed run goes on in the same W&B run
            run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
            run = wandb.init(project="elastic_decode", dir=str(output_dir), config=config, name=output_dir.name,
                             id=run_id, resume="allow" if run_id else None)
            output_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.id)
            self.writers.append(("wandb", run))

    def log(self, row: dict, step: int) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for name, value in values.items():
                    writer.add_scalar(name, value, step)
                writer.flush()
            else:
                writer.log(values, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self.writers = []
