"""The processes of a parallel engine: tensor-parallel worker ranks and data-parallel replicas, started by
rank 0 (the `LLM`'s process) and connected to it over their own group.

Rank 0 runs the scheduler and sends each step's plan (the same host values its own runner uploads) to the
tensor-parallel workers over the control group; every rank then runs the same step. Data-parallel
replicas are whole engines of their own, each given a share of a call's prompts. This module only starts,
connects, checks and stops processes: what a worker rank runs is worker/shard_worker.py, what a replica
runs is elastic_decode/_dp_replica.py (which build an engine or an LLM, layers above this one).
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

from ..errors import ElasticDecodeError
from .group import Group

CONNECT_TIMEOUT_S = 300  # workers import torch and load their shard before the first collective


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


def unpack(payload: str) -> tuple[int, int, int, tuple]:
    """A started rank's payload: (its rank, the group's size, the store's port, what rank 0 gave it). From
    here on the rank dies with its parent (Linux)."""
    _die_with_parent()
    rank, size, port, *rest = pickle.loads(base64.b64decode(payload))
    return rank, size, port, tuple(rest)


def connect(rank: int, size: int, port: int, device: torch.device, timeout_s: float) -> Group:
    """A started rank's group with rank 0 and the others."""
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S))
    return Group(rank, size, store, device, timeout_s)


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
