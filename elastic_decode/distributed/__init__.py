"""Scaling out on torch.distributed, a leaf under the engine: shard arithmetic and collectives (what the
model needs), and the processes of a parallel engine (started, connected, stopped; what they run lives in
the layers above: worker/shard_worker.py, elastic_decode/_dp_replica.py)."""
from .group import Group
from .processes import Replicas, Workers, WorkerSpec, free_port
from .shard import Shard, check_sizes, vocab_parallel_embedding

__all__ = ["Group", "Replicas", "Shard", "WorkerSpec", "Workers", "check_sizes", "free_port",
           "vocab_parallel_embedding"]
