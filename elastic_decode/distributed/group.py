"""One rank's view of a tensor-parallel (or data-parallel) group: the collectives the model and the runner
use, and the pickled commands rank 0 sends the others.

The groups are built from their own TCP store, not torch's default group, so a trainer's own
torch.distributed job is untouched: tensors go over the data group (NCCL on CUDA, gloo on CPU), commands
over a CPU (gloo) control group.
"""
from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist


class Group:
    """One rank's view of the tensor-parallel ranks: the collectives the model and the runner use."""

    def __init__(self, rank: int, size: int, store: dist.Store, device: torch.device, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.size, self.device, self.store = rank, size, device, store
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, timeout)
        if device.type == "cuda":
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size)
        else:
            self.data = self.control

    # tensors (data group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.data.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.data.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        self.data.broadcast(x, 0).wait()
        return x

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank says ok (control group): a step each rank took on its own (joining a trainer's
        group, receiving its broadcast), agreed on before any rank acts on it."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([flag], options).wait()
        return bool(flag.item())

    # objects (control group, from rank 0)

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.control.broadcast(torch.tensor([len(data)], dtype=torch.long), 0).wait()
        self.control.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0).wait()

    def recv(self):
        length = torch.zeros(1, dtype=torch.long)
        self.control.broadcast(length, 0).wait()
        data = torch.empty(int(length), dtype=torch.uint8)
        self.control.broadcast(data, 0).wait()
        return pickle.loads(data.numpy().tobytes())

    # objects between two ranks (control group): data-parallel replicas

    def send_to(self, rank: int, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.control.send([torch.tensor([len(data)], dtype=torch.long)], rank, 0).wait()
        self.control.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], rank, 1).wait()

    def recv_from(self, rank: int):
        length = torch.zeros(1, dtype=torch.long)
        self.control.recv([length], rank, 0).wait()
        data = torch.empty(int(length), dtype=torch.uint8)
        self.control.recv([data], rank, 1).wait()
        return pickle.loads(data.numpy().tobytes())
