"""The end-of-run picture: reward and accuracy, and thinking / solution lengths, over steps."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot (pip install "elastic_decode[train]")', file=sys.stderr)
        return None
    return plt


def save(plt, fig, png_path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]


def plot_sft_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """The loss curve of an SFT / distillation run."""
    plt, rows = pyplot(), _rows(metrics_path)
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss (completion tokens)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("negative log-likelihood per token")
    ax.legend(loc="best")
    return save(plt, fig, png_path)


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Write a PNG of a GRPO run's metrics.jsonl; returns its path, or None without matplotlib/rows."""
    plt, rows = pyplot(), _rows(metrics_path)
    if plt is None or not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    top.plot(steps, mean, label="reward (mean)")
    top.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    top.plot(steps, [r["accuracy"] for r in rows], label="accuracy")
    top.plot(steps, [r["format_rate"] for r in rows], label="boxed answer rate", linestyle="--")
    top.set_ylabel("per completion")
    top.legend(loc="best")
    bottom.plot(steps, [r["think_tokens"] for r in rows], label="thinking tokens")
    bottom.plot(steps, [r["solution_tokens"] for r in rows], label="solution tokens")
    bottom.plot(steps, [100 * r["forced_end_rate"] for r in rows], label="forced end (%)", linestyle=":")
    bottom.set_xlabel("step")
    bottom.set_ylabel("mean per completion")
    bottom.legend(loc="best")
    return save(plt, fig, png_path)
