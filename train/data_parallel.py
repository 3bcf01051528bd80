"""Data-parallel GRPO under `torchrun --nproc-per-node N -m elastic_decode.train ...`.

Each rank rolls out its share of the step's prompts (dealt round-robin; a prompt's whole group stays
on one rank, so group advantages are unchanged) on its own engine, computes the loss of its rows
normalised by the whole step's token and row counts, and the gradients are summed over ranks before
clipping and the optimizer step (what DDP does, with the sum made explicit so that N ranks compute the
1-rank gradient up to float order). Every rank then holds the same weights and copies them into its own
engine. Rank 0 writes metrics, checkpoints and the plot.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int
    size: int

    @staticmethod
    def from_env(device_type: str) -> "DataParallel | None":
        """The torchrun job this process belongs to (WORLD_SIZE > 1), or None."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return DataParallel(dist.get_rank(), dist.get_world_size())

    @staticmethod
    def local_device(device: torch.device) -> torch.device:
        """Under torchrun, rank i of a machine takes GPU LOCAL_RANK."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        return items[self.rank :: self.size]

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def sum_gradients(self, params) -> None:
        """Every rank's gradients summed, in one collective (flattened)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
