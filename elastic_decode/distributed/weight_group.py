"""Weights from a trainer over a torch.distributed group the trainer opens, as SGLang's, OpenRLHF's, AReaL's,
slime's and SkyRL's servers take them (`/init_weights_update_group`, `/update_weights_from_distributed`).

Both sides build the group the same way, so a trainer written for SGLang reaches this server unchanged:
rendezvous on `tcp://master_address:master_port` (the trainer, rank 0, hosts the store), a
`PrefixStore(group_name, store)`, the process group made on it by torch's own helper, registered so
`torch.distributed.broadcast(tensor, src=0, group=pg)` works on it. The engine's ranks are `rank_offset`
and up (one per tensor-parallel rank); `world_size` counts the trainer. Then, per update, the trainer
broadcasts each tensor in the order the request names them, and every engine rank receives it whole
(each keeps its own slice). gloo on CPU (so CI tests it with a trainer process), NCCL on GPUs.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ElasticDecodeError

# The engine waits this long for every rank to join (it takes no request meanwhile), and a broadcast of an
# update this long for the trainer's side: a trainer that never comes costs minutes, not half an hour.
JOIN_TIMEOUT = datetime.timedelta(minutes=5)
OP_TIMEOUT = datetime.timedelta(minutes=10)
BACKENDS = ("gloo", "nccl")


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: datetime.timedelta = OP_TIMEOUT,
                              join_timeout: datetime.timedelta = JOIN_TIMEOUT) -> dist.ProcessGroup:
    """A process group of its own, outside torch's default one (which the trainer may use for itself): the
    recipe of SGLang's and OpenRLHF's `init_custom_process_group`, on torch's private helper as they are.
    Blocks until every rank has joined."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=join_timeout))
    store.set_timeout(join_timeout)  # the group's creation waits on the store too: within the join's time
    prefixed = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), prefixed, group_name=group_name,
                                      timeout=timeout)
    store.set_timeout(timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def check_join(rank_offset: int, ranks: int, world_size: int, backend: str, device: torch.device) -> None:
    """What a join needs, checked before any rank tries: the engine's `ranks` ranks from `rank_offset` on fit
    in the group after the trainer's rank 0, and the backend runs here."""
    if backend not in BACKENDS:
        raise ElasticDecodeError(f"backend {backend!r} is not supported: one of {', '.join(BACKENDS)}")
    if backend == "nccl" and device.type != "cuda":
        raise ElasticDecodeError(f"backend nccl needs a CUDA engine; this one runs on {device}: use gloo")
    if rank_offset < 1 or rank_offset + ranks > world_size:
        raise ElasticDecodeError(f"this engine's {ranks} rank(s) from rank_offset {rank_offset} do not fit in a group "
                                 f"of world_size {world_size} (rank 0 is the trainer's)")


def check_update(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
    """What an update needs before any tensor is received: one dtype and one shape per name, each receivable."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ElasticDecodeError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
    for dtype in dtypes:
        torch_dtype(dtype)
    for name, shape in zip(names, shapes):
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ElasticDecodeError(f"shape {shape} of {name!r} is not a list of non-negative integers")


def torch_dtype(name: str) -> torch.dtype:
    """A dtype as the trainers name it: "bfloat16" (or "torch.bfloat16"); floating point only."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ElasticDecodeError(f"dtype {name!r} is not a floating-point torch dtype")
    return dtype


@dataclass
class WeightGroup:
    """One engine rank's end of a trainer's weight group."""

    name: str
    pg: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def join(cls, master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str,
             device: torch.device) -> WeightGroup:
        check_join(rank, 1, world_size, backend, device)
        pg = init_custom_process_group(backend, f"tcp://{master_address}:{master_port}", world_size, rank, group_name)
        return cls(group_name, pg, rank, world_size, device)

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
        """Every tensor the trainer broadcasts (from rank 0), in the order named, on this rank's device."""
        out = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            tensor = torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=self.device)
            dist.broadcast(tensor, src=0, group=self.pg)
            out.append((name, tensor))
        return out

    def destroy(self) -> None:
        dist.destroy_process_group(self.pg)
