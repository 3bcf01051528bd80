"""Tensor parallelism on torch.distributed: which slice of each weight a rank holds, the collectives
the model needs, and the worker processes an `LLM(tensor_parallel_size=N)` starts itself.

Sharding is Megatron-LM's (Shoeybi et al. 2019), as vLLM applies it to Llama: q/k/v and gate/up are
column-parallel (each rank owns whole attention heads and a slice of the MLP), o_proj and down_proj
row-parallel with an all-reduce after them, the embedding and the LM head split by vocabulary
(vocab-parallel lookup with an all-reduce; logits all-gathered, so the sampler and the budget machine
see the full vocabulary). When there are fewer kv heads than ranks, each kv head is replicated on
N / num_kv_heads ranks (vLLM's rule); each rank's KV cache holds only its kv heads.

Rank 0 (the `LLM`'s process) runs the scheduler and sends each step's plan (the same host values its
own runner uploads) to the workers over a CPU (gloo) control group; the tensors go over the data group
(gloo on CPU, NCCL on CUDA). Every rank then runs the same step: the same gathered logits and the same
sampler inputs give the same tokens on every rank, so no token is sent back. The groups are built from
their own TCP store, not torch's default group, so a trainer's own torch.distributed job is untouched.
"""
from __future__ import annotations

import base64
import datetime
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .errors import ElasticDecodeError

CONNECT_TIMEOUT_S = 300  # workers import torch and load their shard before the first collective


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: the slice of the model it holds."""

    rank: int
    size: int
    q_heads: int  # local
    kv_heads: int  # local
    kv_first: int  # first kv head of this rank (global index)
    head_dim: int
    intermediate: int  # local
    vocab: int  # local rows of the embedding / LM head (the last rank's padded)
    vocab_start: int
    full_vocab: int
    full_kv_heads: int

    @staticmethod
    def of(spec, rank: int, size: int) -> "Shard":
        hq, hkv = spec.num_q_heads, spec.num_kv_heads
        kv_heads = max(1, hkv // size)
        kv_first = rank * hkv // size if hkv < size else rank * kv_heads
        vocab = -(-spec.vocab_size // size)
        return Shard(rank=rank, size=size, q_heads=hq // size, kv_heads=kv_heads, kv_first=kv_first,
                     head_dim=spec.head_dim, intermediate=spec.intermediate_size // size, vocab=vocab,
                     vocab_start=rank * vocab, full_vocab=spec.vocab_size, full_kv_heads=hkv)

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's part of the HF weight `name`; None if replicated."""
        d = self.head_dim
        parts = name.rsplit(".", 2)
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else (name, "")
        if module == "q_proj":
            return 0, self.rank * self.q_heads * d, (self.rank + 1) * self.q_heads * d
        if module in ("k_proj", "v_proj"):
            return 0, self.kv_first * d, (self.kv_first + self.kv_heads) * d
        if module in ("gate_proj", "up_proj"):
            return 0, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if kind == "weight" and module == "o_proj":
            return 1, self.rank * self.q_heads * d, (self.rank + 1) * self.q_heads * d
        if kind == "weight" and module == "down_proj":
            return 1, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab_start, self.vocab_start + self.vocab
        return None  # norms, o_proj / down_proj biases (added once, after the all-reduce)

    def full_shape(self, name: str, local: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of a weight whose local part has shape `local`."""
        split = self.split(name)
        if split is None:
            return tuple(local)
        dim = split[0]
        shape = list(local)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape[0] = self.full_vocab
        elif name.rsplit(".", 2)[-2] in ("k_proj", "v_proj"):
            shape[0] = self.full_kv_heads * self.head_dim
        else:
            shape[dim] = local[dim] * self.size
        return tuple(shape)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full HF tensor (the vocabulary padded with zeros at the end)."""
        split = self.split(name)
        if split is None:
            return tensor
        dim, start, stop = split
        return _padded(tensor.narrow(dim, start, max(0, min(stop, tensor.shape[dim]) - start)), dim, stop - start)

    def read(self, name: str, stored) -> torch.Tensor:
        """This rank's part of a weight in a safetensors file (`safe_open(...).get_slice(name)`),
        reading only that part."""
        split = self.split(name)
        if split is None:
            return stored[:]
        dim, start, stop = split
        end = min(stop, stored.get_shape()[dim])
        part = stored[start:end] if dim == 0 else stored[:, start:end]
        return _padded(part, dim, stop - start)


def _padded(part: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    if part.shape[dim] >= length:
        return part
    pad = list(part.shape)
    pad[dim] = length - part.shape[dim]
    return torch.cat([part, part.new_zeros(pad)], dim=dim)


def check_sizes(spec, size, device: torch.device) -> None:
    """Refuse a tensor-parallel size this model or machine cannot take, before any process starts."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ElasticDecodeError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return
    hq, hkv = spec.num_q_heads, spec.num_kv_heads
    if hq % size:
        raise ElasticDecodeError(f"tensor_parallel_size {size} must divide the model's {hq} attention heads")
    if hkv % size and size % hkv:
        raise ElasticDecodeError(f"tensor_parallel_size {size} and the model's {hkv} kv heads: one must divide the "
                                 "other (kv heads are split, or replicated when there are fewer than ranks)")
    if spec.intermediate_size % size:
        raise ElasticDecodeError(f"tensor_parallel_size {size} must divide the MLP width {spec.intermediate_size}")
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ElasticDecodeError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                                 f"{torch.cuda.device_count()}")


# -- the groups --------------------------------------------------------------------------------


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


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, shard: Shard, group: Group) -> torch.Tensor:
    """Rows of the full embedding from vocabulary shards: each rank looks up the ids it holds."""
    local = ids - shard.vocab_start
    outside = (local < 0) | (local >= shard.vocab)
    x = F.embedding(local.clamp(0, shard.vocab - 1), weight)  # [num_tokens, hidden]
    x = x.masked_fill(outside[:, None], 0)
    return group.all_reduce(x)


# -- worker processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard of the engine (picklable)."""

    path: str
    dtype: str  # torch dtype name
    device: str  # e.g. "cpu", "cuda:1"
    backend: str | None
    quantization: str | None
    block_size: int
    max_model_len: int
    timeout_s: float
    threads: int  # torch CPU threads (rank 0's count: the processes of one engine share the cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Ranks 1..N-1 as child processes, and rank 0's group with them.

    Each worker is `python -m elastic_decode._tp_worker` (not a multiprocessing child), so a user's
    script needs no `if __name__ == "__main__"` guard and is never imported twice. A worker dies
    with its parent (Linux: PR_SET_PDEATHSIG; elsewhere it exits when its connection breaks)."""

    def __init__(self, size: int, spec: WorkerSpec, device: torch.device):
        self.size = size
        payloads = [(replace(spec, device=f"cuda:{(device.index or 0) + rank}" if device.type == "cuda" else "cpu"),)
                    for rank in range(1, size)]
        self.processes, self.group, self._store = _start_ranks("elastic_decode._tp_worker", payloads, device,
                                                               spec.timeout_s, self, "tensor-parallel workers")

    def exit_codes(self) -> str:
        return "".join(f"; worker {rank} exited with code {p.returncode}"
                       for rank, p in enumerate(self.processes, 1) if p.poll() is not None)

    def check(self) -> None:
        """Raise if a worker has died (its rank's weights and KV cache are gone with it)."""
        for rank, p in enumerate(self.processes, 1):
            if p.poll() is not None:
                raise ElasticDecodeError(f"tensor-parallel worker {rank} exited (code {p.returncode}); this engine "
                                         "cannot go on (create the LLM again)")

    def send(self, obj) -> None:
        self.check()
        try:
            self.group.send(obj)
        except RuntimeError as e:  # a collective failed: a worker died or hung past the timeout
            raise ElasticDecodeError(f"tensor-parallel workers stopped answering: {e}{self.exit_codes()}") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the workers to exit; kill the ones that do not."""
        if hasattr(self, "group") and all(p.poll() is None for p in self.processes):
            try:
                self.group.send(("stop",))
            except Exception:  # noqa: BLE001 - a broken group: the processes are killed below
                pass
        _reap(self.processes, timeout_s)


def _reap(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for processes asked to exit; kill those that do not."""
    for p in processes:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout_s)


def _start_ranks(module: str, payloads: list[tuple], device: torch.device, timeout_s: float, owner,
                 what: str) -> tuple[list[subprocess.Popen], Group, dist.Store]:
    """Start `python -m module` for ranks 1..len(payloads) (each given (rank, size, port, *payload))
    and connect rank 0's group to them."""
    size = len(payloads) + 1
    port = free_port()
    timeout = datetime.timedelta(seconds=CONNECT_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, size, True, timeout=timeout, wait_for_workers=False)
    owner.processes = []
    for rank, payload in enumerate(payloads, 1):
        encoded = base64.b64encode(pickle.dumps((rank, size, port, *payload))).decode()
        owner.processes.append(subprocess.Popen([sys.executable, "-m", module, encoded], stdin=subprocess.DEVNULL))
    try:
        group = _connect(0, size, store, device, timeout_s, owner.check)
    except BaseException as e:
        owner.stop()
        raise ElasticDecodeError(f"the {what} did not start: {e}{owner.exit_codes()}") from None
    return owner.processes, group, store


def _connect(rank: int, size: int, store: dist.Store, device: torch.device, timeout_s: float,
             check=None) -> Group:
    """The group, built in a thread so rank 0 can notice a worker that died before connecting."""
    box: dict = {}

    def build():
        try:
            box["group"] = Group(rank, size, store, device, timeout_s)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while thread.is_alive():
        thread.join(0.2)
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ElasticDecodeError(f"no connection within {CONNECT_TIMEOUT_S} s")
    if "error" in box:
        raise box["error"]
    return box["group"]


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the broken connection ends the worker instead
        pass


def unpack(payload: str) -> tuple:
    return pickle.loads(base64.b64decode(payload))


def worker_main(payload: str) -> int:
    """A worker rank: build its shard, then run what rank 0 sends until it says stop (or goes away)."""
    _die_with_parent()
    rank, size, port, spec = unpack(payload)
    torch.set_num_threads(spec.threads)
    from .engine import ShardWorker

    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S))
    group = Group(rank, size, store, device, spec.timeout_s)
    try:
        ShardWorker(spec, group).serve()
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:  # rank 0 went away (its end of the connection closed)
        print(f"elastic_decode tensor-parallel worker {rank}: {e}", file=sys.stderr)
        return 1
    return 0


# -- data parallelism ----------------------------------------------------------------------------


class Replicas:
    """Data-parallel engine replicas 1..N-1 (replica 0 is the LLM's own engine), each a process
    `python -m elastic_decode._dp_replica` with a whole engine of its own (tensor-parallel itself if
    asked). Rank 0 hands each a share of a call's prompts and collects its outputs over a gloo group."""

    def __init__(self, size: int, engine_kwargs: list[dict], timeout_s: float):
        self.size = size
        self.processes, self.group, self._store = _start_ranks(
            "elastic_decode._dp_replica", [(kwargs, timeout_s, torch.get_num_threads()) for kwargs in engine_kwargs],
            torch.device("cpu"),
            timeout_s, self, "data-parallel replicas")
        try:
            for rank in range(1, size):  # each replica says when its engine is up (or why it is not)
                self.reply(rank)
        except BaseException:
            self.stop()
            raise

    exit_codes = Workers.exit_codes

    def check(self) -> None:
        for rank, p in enumerate(self.processes, 1):
            if p.poll() is not None:
                raise ElasticDecodeError(f"data-parallel replica {rank} exited (code {p.returncode}); this LLM cannot "
                                         "go on (create it again)")

    def send(self, rank: int, obj) -> None:
        self.check()
        try:
            self.group.send_to(rank, obj)
        except RuntimeError as e:
            raise ElasticDecodeError(f"data-parallel replica {rank} stopped answering: {e}{self.exit_codes()}") from None

    def reply(self, rank: int):
        """Replica `rank`'s answer to the last command: its value, or its error raised here."""
        try:
            status, value = self.group.recv_from(rank)
        except RuntimeError as e:
            raise ElasticDecodeError(f"data-parallel replica {rank} stopped answering: {e}{self.exit_codes()}") from None
        if status == "error":
            kind, message = value
            raise kind(f"data-parallel replica {rank}: {message}")
        return value

    def everywhere(self, command: tuple) -> list:
        """Send every replica `command`; their answers."""
        for rank in range(1, self.size):
            self.send(rank, command)
        return [self.reply(rank) for rank in range(1, self.size)]

    def stop(self, timeout_s: float = 30.0) -> None:
        if getattr(self, "group", None) is not None:
            for rank, p in enumerate(self.processes, 1):
                if p.poll() is None:
                    try:
                        self.group.send_to(rank, ("stop",))
                    except Exception:  # noqa: BLE001 - the processes are killed below
                        pass
        _reap(self.processes, timeout_s)


def replica_main(payload: str) -> int:
    """A data-parallel replica: its own LLM, serving the commands of rank 0 until stop."""
    _die_with_parent()
    rank, size, port, kwargs, timeout_s, threads = unpack(payload)
    torch.set_num_threads(threads)
    device = torch.device(kwargs.get("device") or "cpu")
    if device.type == "cuda":  # its own GPU current from the start (the launchers take their tensors' anyway)
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S))
    group = Group(rank, size, store, torch.device("cpu"), timeout_s)
    from .errors import ElasticDecodeError as UserError
    from .llm import LLM

    def answer(fn) -> None:
        try:
            group.send_to(0, ("ok", fn()))
        except UserError as e:  # the user's mistake or the model's state: rank 0 raises it as it is
            group.send_to(0, ("error", (type(e), str(e))))
        except Exception as e:  # noqa: BLE001 - anything else, reported in one line by rank 0
            group.send_to(0, ("error", (ElasticDecodeError, f"{type(e).__name__}: {e}")))

    llm = None

    def start():
        nonlocal llm
        llm = LLM(**kwargs)

    answer(start)
    if llm is None:
        return 1
    try:
        while True:
            command, *args = group.recv_from(0)
            if command == "generate":
                answer(lambda: llm._run(args[0], args[1], use_tqdm=False))
            elif command == "load":
                answer(lambda: llm.load_weights(args[0]))
            elif command == "sleep":
                answer(llm.sleep)
            elif command == "wake":
                answer(llm.wake_up)
            elif command == "stop":
                llm.close()
                return 0
    except RuntimeError as e:  # rank 0 went away
        print(f"elastic_decode data-parallel replica {rank}: {e}", file=sys.stderr)
        llm.close()
        return 1
