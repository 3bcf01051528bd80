"""A tensor-parallel rank other than 0: its shard of the model and of the KV cache, running what rank 0
sends (distributed/processes.py starts it as `python -m elastic_decode._tp_worker`).

Rank 0 sends the KV cache's size first, then commands: "step" (a StepPlan: the same host values rank 0's
own runner runs, so every rank computes the same step), "load" (weights, broadcast one by one in the order
named), "sleep" / "wake" (the KV cache), the "weight_group_*" commands (join a trainer's group, receive its
broadcast, apply or drop it as rank 0 decides: distributed/weight_group.py) and "stop".
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..distributed.group import Group
from ..distributed.processes import WorkerSpec, connect, unpack
from ..distributed.weight_group import WeightGroup
from ..models import ModelSpec
from ..models.loader import build_model
from .backend import select_ops
from .model_runner import ModelRunner, allocate_kv_caches


class ShardWorker:
    def __init__(self, spec: WorkerSpec, group: Group):
        from transformers import AutoConfig

        self.spec, self.group = spec, group
        path = Path(spec.path)
        hf_config = AutoConfig.from_pretrained(path)
        self.device = torch.device(spec.device)
        self.model = build_model(path, hf_config, ModelSpec.from_hf_config(hf_config), getattr(torch, spec.dtype),
                                 self.device, spec.max_model_len, group)
        command, self.num_blocks = group.recv()  # rank 0 sends the cache size first
        if command != "kv":
            raise RuntimeError(f"tensor-parallel worker: expected the KV cache size, got {command!r}")
        self.runner = ModelRunner(self.model, allocate_kv_caches(self.model, self.num_blocks, spec.block_size),
                                  select_ops(self.device, spec.backend, spec.quantization), spec.block_size)
        self.runner.prepare_weights()
        self.weight_groups: dict[str, WeightGroup] = {}  # trainers' groups (distributed/weight_group.py)
        self.received: list = []

    def serve(self) -> None:
        while True:
            command, *args = self.group.recv()
            if command == "step":
                self.runner.execute(args[0])
            elif command == "load":
                params = dict(self.model.named_parameters())
                for name, shape, dtype in args[0]:
                    full = self.group.broadcast(torch.empty(shape, dtype=dtype, device=self.device))
                    with torch.no_grad():
                        self.model.hf_parameter(name, params).copy_(self.model.shard.take(name, full))
                self.runner.prepare_weights()
            elif command == "sleep":
                self.runner.free_kv_cache()
            elif command == "wake":
                self.runner.allocate_kv_cache(self.num_blocks)
            elif command.startswith("weight_group_"):
                self.weight_group(command, *args)
            elif command == "stop":
                return


    def weight_group(self, command: str, *args) -> None:
        """A trainer's weight group (distributed/weight_group.py), as rank 0 says. After a join, a receive and
        an apply every rank says whether it succeeded (`Group.all_ok`), so rank 0 answers its client for all:
        a failure here is printed and rank 0 undoes or reports it."""
        if command == "weight_group_join":  # (address, port, rank offset, world size, name, backend)
            address, port, offset, world, name, backend = args
            old = self.weight_groups.pop(name, None)
            if old is not None:
                self._try(command, old.destroy)
            self.group.all_ok(self._try(command, lambda: self.weight_groups.__setitem__(name, WeightGroup.join(
                address, port, offset + self.group.rank, world, name, backend, self.device))))
        elif command == "weight_group_recv":  # every tensor received whole; kept until rank 0 decides
            name, names, dtypes, shapes = args

            def receive():
                self.received = self.weight_groups[name].receive(names, dtypes, shapes)
            self.received = []
            self.group.all_ok(self._try(command, receive))
        elif command == "weight_group_apply":  # the names rank 0 kept (none: the update was refused)
            kept, received, self.received = set(args[0]), self.received, []

            def apply():
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, full in received:
                        if name in kept:
                            self.model.hf_parameter(name, params).copy_(self.model.shard.take(name, full))
                if kept:
                    self.runner.prepare_weights()
            self.group.all_ok(self._try(command, apply))
        elif command == "weight_group_destroy":
            group = self.weight_groups.pop(args[0], None)
            if group is not None:
                self._try(command, group.destroy)

    def _try(self, command: str, step) -> bool:
        try:
            step()
            return True
        except Exception as e:  # noqa: BLE001 - printed here; rank 0 hears of it through all_ok
            print(f"elastic_decode worker rank {self.group.rank}: {command} failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return False


def worker_main(payload: str) -> int:
    """A worker rank: build its shard, then run what rank 0 sends until it says stop (or goes away)."""
    rank, size, port, (spec,) = unpack(payload)
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = connect(rank, size, port, device, spec.timeout_s)
    try:
        ShardWorker(spec, group).serve()
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:  # rank 0 went away (its end of the connection closed)
        print(f"elastic_decode tensor-parallel worker {rank}: {e}", file=sys.stderr)
        return 1
    return 0
