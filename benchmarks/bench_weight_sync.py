"""Weights from a trainer into a running server, three ways, on the same checkpoint: over a
torch.distributed group the trainer opens (SGLang's /init_weights_update_group +
/update_weights_from_distributed, what slime, AReaL and OpenRLHF do; gloo on CPU, NCCL on GPUs), from a
checkpoint directory on disk (SGLang's /update_weights_from_disk), and our /update_weights with the
same directory. This process is the trainer (rank 0): it posts the update, then broadcasts each tensor
in the order named. Each way runs --rounds times; reported: median seconds per update, MB/s of weights.

    .venv/bin/python benchmarks/bench_weight_sync.py --rounds 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench_serve import free_port, start_server  # the script's folder is on the path when it runs


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())


def while_posting(url: str, path: str, body: dict, work) -> dict:
    """POST on a thread while `work` runs here (the trainer's side of a collective)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("reply", post(url, path, body)))
    thread.start()
    work()
    thread.join(600)
    return box["reply"]


def join_group(url: str, port: int) -> torch.distributed.ProcessGroup:
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)
    group = []

    def join():
        timeout = datetime.timedelta(minutes=5)
        store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2, timeout=timeout))
        pg, _ = _new_process_group_helper(2, 0, [], Backend("gloo"), PrefixStore("bench", store), group_name="bench",
                                          timeout=timeout)
        _world.pg_group_ranks[pg] = {0: 0, 1: 1}
        group.append(pg)
    reply = while_posting(url, "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                          "rank_offset": 1, "world_size": 2, "group_name": "bench", "backend": "gloo"}, join)
    assert reply["success"], reply
    return group[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a HF checkpoint directory (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.device, args.clients = "cpu", 1
    if args.model is None:
        from elastic_decode.models.loader import convert_gguf, embedded_gguf_path
        args.model = str(convert_gguf(embedded_gguf_path()))
    checkpoint = Path(args.model)
    weights = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(weights)
    megabytes = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        pg = join_group(url, free_port())
        body = {"names": names, "dtypes": [str(weights[n].dtype).removeprefix("torch.") for n in names],
                "shapes": [list(weights[n].shape) for n in names], "group_name": "bench"}

        def broadcast():
            for n in names:
                torch.distributed.broadcast(weights[n].contiguous(), src=0, group=pg)

        ways = {
            "trainer's group (gloo broadcast)": lambda: while_posting(
                url, "/update_weights_from_distributed", body, broadcast)["success"],
            "SGLang /update_weights_from_disk": lambda: post(
                url, "/update_weights_from_disk", {"model_path": str(checkpoint)})["success"],
            "our /update_weights (path)": lambda: post(url, "/update_weights", {"path": str(checkpoint)})["updated"],
        }
        rows = []
        for way, update in ways.items():
            seconds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                assert update(), way
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            rows.append((way, median, min(seconds), megabytes / median))
        post(url, "/destroy_weights_update_group", {"group_name": "bench"})
        torch.distributed.destroy_process_group(pg)
    finally:
        server.terminate()
        server.wait(60)
    print(f"device: cpu ({platform.machine()}, {torch.get_num_threads()} threads); model: {checkpoint.name}; "
          f"{len(names)} tensors, {megabytes:.0f} MB; {args.rounds} rounds each, the server on the same machine\n")
    print("| way | median s per update | best s | MB/s (median) |\n| --- | --- | --- | --- |")
    for way, median, best, rate in rows:
        print(f"| {way} | {median:.3f} | {best:.3f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
