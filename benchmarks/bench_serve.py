"""The server under load: N concurrent streaming clients (the `openai` async client) against
`python -m elastic_decode.serve` on loopback for a bounded time, and the same requests through
`LLM.chat` in-process (in waves of N, the batch the server sees) as the baseline.

Each client sends budgeted chat requests back to back (thinking and solution budgets, a distinct
seed per request). Reported: requests/s, output tokens/s, time to first token and latency (p50 /
p99), errors (must be 0), and the server's output tokens/s over the in-process run's (its overhead).
Prints a markdown table for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_serve.py --clients 16 --duration 30

`--soak` runs the server under faults instead, in bounded rounds: each round M concurrent clients send a
mix of streamed and plain requests, one in five of them vanishing early (a stream closed after a few
chunks, a plain request's socket closed mid-generation), while the round pauses the engine (keep, then
a weight update in flight, then resume; every other round an abort pause). After each round it reads
the server's /metrics and its RSS: KV blocks in use must be back at 0, memory flat after warm-up.

    .venv/bin/python benchmarks/bench_serve.py --soak --rounds 10 --clients 16
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

QUESTIONS = [
    "What is 17 * 23?",
    "Name three prime numbers larger than 50.",
    "Why is the sky blue?",
    "What is the derivative of x^3 + 2x?",
    "If a train travels 120 km at 80 km/h, how long does it take?",
    "Translate 'good morning' into French.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elastic_decode.serve", "--port", str(port), "--log-level", "warning",
           "--device", args.device, "--served-model-name", "bench", "--max-num-seqs", str(max(args.clients, 1))]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


async def load(url: str, args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    ttft, latency, tokens, errors, done = [], [], [], [], []
    stop_at = time.perf_counter() + args.duration
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            i = next(counter)
            start = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
                    extra_body={"thinking_budget": args.think_budget, "solution_budget": args.solution_budget})
                async for chunk in stream:
                    if first is None and chunk.choices:
                        delta = chunk.choices[0].delta
                        if delta.content or (delta.model_extra or {}).get("reasoning"):
                            first = time.perf_counter() - start
                    if chunk.usage is not None:
                        tokens.append(chunk.usage.completion_tokens)
                latency.append(time.perf_counter() - start)
                ttft.append(first if first is not None else latency[-1])
                done.append(i)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return {"seconds": seconds, "requests": len(done), "tokens": sum(tokens), "ttft": ttft, "latency": latency,
            "errors": errors, "seeds": done}


def engine_counters(url: str) -> dict:
    """Steps, prefill steps, sequences stepped and seconds inside steps, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    names = {"engine_steps_total": "steps", "engine_prefill_steps_total": "prefills",
             "engine_step_sequences_total": "sequences", "engine_step_seconds_total": "seconds"}
    out = {}
    for line in lines:
        name, _, value = line.partition(" ")
        key = names.get(name.removeprefix("elastic_decode_"))
        if key:
            out[key] = float(value)
    return out


def counting(engine) -> dict:
    """Wrap engine.step to count what the in-process run steps (as the server's /metrics does)."""
    counts = {"steps": 0, "prefills": 0, "sequences": 0, "seconds": 0.0}
    step = engine.step

    def counted():
        start = time.perf_counter()
        out = step()
        counts["seconds"] += time.perf_counter() - start
        counts["steps"] += 1
        counts["prefills"] += engine.last_batch.is_prefill
        counts["sequences"] += len(engine.last_batch.seqs)
        return out

    engine.step = counted
    return counts


def in_process(args, seeds: list[int]) -> dict:
    """The server's finished requests, through LLM.chat in waves of `clients` (its batch)."""
    from elastic_decode import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, max_num_seqs=max(args.clients, 1))
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in seeds]
    params = [SamplingParams(temperature=0.7, seed=i, think_budget=args.think_budget,
                             solution_budget=args.solution_budget) for i in seeds]
    llm.chat(convs[:1], params[:1], use_tqdm=False)  # warm-up
    counts = counting(llm.engine)
    start = time.perf_counter()
    tokens = 0
    for w in range(0, len(convs), args.clients):
        outs = llm.chat(convs[w:w + args.clients], params[w:w + args.clients], use_tqdm=False)
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": time.perf_counter() - start, "requests": len(convs), "tokens": tokens, "engine": counts}


# -- the soak ------------------------------------------------------------------------------------------


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"elastic_decode_{name} ") or line.startswith(f"elastic_decode_{name}{{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


async def post_json(url: str, path: str, body: dict) -> tuple[int, dict]:
    import json

    def call():
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    return await asyncio.to_thread(call)


async def vanish(port: int, body: dict, after: float) -> None:
    """A plain request whose client closes its socket `after` seconds in."""
    import json

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()


async def soak_round(url: str, port: int, args, r: int, checkpoint: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    outcome = {"completed": 0, "errors": [], "aborted": 0, "vanished": 0, "latency": []}

    def body(i: int) -> dict:
        return {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "temperature": 0.7, "seed": r * 1000 + i, "thinking_budget": args.think_budget,
                "solution_budget": args.solution_budget}

    async def one(i: int) -> None:
        start = time.perf_counter()
        early = i % 5 == 4  # one in five clients goes away early
        try:
            if early and i % 2:
                outcome["vanished"] += 1
                return await vanish(port, body(i), 0.3)
            if i % 2:  # plain
                status, reply = await post_json(url, "/v1/chat/completions", body(i))
                if status != 200:
                    raise RuntimeError(f"{status} {reply}")
                reasons = [c["finish_reason"] for c in reply["choices"]]
            else:
                b = body(i)
                stream = await client.chat.completions.create(
                    model=b["model"], messages=b["messages"], temperature=b["temperature"], seed=b["seed"],
                    stream=True, extra_body={"thinking_budget": args.think_budget, "solution_budget": args.solution_budget})
                reasons, chunks = [], 0
                async for chunk in stream:
                    chunks += 1
                    reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
                    if early and chunks == 3:
                        outcome["vanished"] += 1
                        await stream.close()
                        return
            outcome["latency"].append(time.perf_counter() - start)
            outcome["aborted" if "abort" in reasons else "completed"] += 1
        except Exception as e:  # noqa: BLE001 - counted and reported
            outcome["errors"].append(f"{type(e).__name__}: {e}")

    async def control() -> None:
        await asyncio.sleep(0.5)
        if r % 2 == 0:  # an RL trainer's weight sync in flight
            await post_json(url, "/pause", {"mode": "keep"})
            await post_json(url, "/update_weights", {"path": checkpoint})
            await post_json(url, "/resume", {})
        else:
            await post_json(url, "/pause", {"mode": "abort"})
            await post_json(url, "/resume", {})

    await asyncio.gather(control(), *(one(i) for i in range(args.clients)))
    await client.close()
    return outcome


def soak(args) -> None:
    from elastic_decode.models.loader import resolve_checkpoint

    checkpoint = str(resolve_checkpoint(args.model))
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for r in range(args.rounds):
            start = time.perf_counter()
            out = asyncio.run(soak_round(url, port, args, r, checkpoint))
            deadline = time.monotonic() + 10
            while metric(url, "kv_blocks_used") > 0 and time.monotonic() < deadline:
                time.sleep(0.1)  # a vanished client's abort lands within a second
            rows.append((r, out, metric(url, "kv_blocks_used"), metric(url, "requests_running"), rss_mb(server.pid),
                         time.perf_counter() - start))
            print(f"round {r}: {out['completed']} completed, {out['aborted']} aborted, {out['vanished']} vanished, "
                  f"{len(out['errors'])} errors, KV blocks in use {rows[-1][2]:.0f}, RSS {rows[-1][4]:.0f} MB",
                  file=sys.stderr)
        aborts = {cause: metric(url, f'requests_aborted_total{{cause="{cause}"}}') for cause in ("client", "pause")}
    finally:
        server.send_signal(15)
        server.wait(timeout=60)
    print(f"device: {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"model: {args.model or 'embedded SmolLM2-135M-Instruct'}; {args.rounds} rounds of {args.clients} clients "
          f"(half streamed, 1 in 5 vanishing early), a pause keep + weight update or a pause abort each round; "
          f"budgets think {args.think_budget} / solution {args.solution_budget}; server exit code {server.returncode}")
    print()
    print("| round | completed | aborted (pause) | vanished | errors | latency p50 / p99 (s) | KV blocks in use after "
          "| requests running after | server RSS (MB) | round (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r, out, blocks, running, rss, seconds in rows:
        print(f"| {r} | {out['completed']} | {out['aborted']} | {out['vanished']} | {len(out['errors'])} | "
              f"{percentile(out['latency'], 0.5):.2f} / {percentile(out['latency'], 0.99):.2f} | {blocks:.0f} | "
              f"{running:.0f} | {rss:.0f} | {seconds:.1f} |")
    print()
    print(f"aborts counted by the server: {aborts}")
    errors = [e for _, out, *_ in rows for e in out["errors"]]
    if errors:
        print("errors:", *sorted(set(errors))[:5], sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load")
    parser.add_argument("--think-budget", type=int, default=32)
    parser.add_argument("--solution-budget", type=int, default=16)
    parser.add_argument("--soak", action="store_true", help="the bounded soak under faults (see the docstring)")
    parser.add_argument("--rounds", type=int, default=10, help="soak rounds")
    args = parser.parse_args()
    if args.soak:
        return soak(args)

    port = free_port()
    server = start_server(args, port)
    try:
        served = asyncio.run(load(f"http://127.0.0.1:{port}", args))
        served["engine"] = engine_counters(f"http://127.0.0.1:{port}")
    finally:
        server.send_signal(2)
        server.wait(timeout=60)
    base = in_process(args, served["seeds"])
    rate = served["tokens"] / served["seconds"]
    base_rate = base["tokens"] / base["seconds"]
    print(f"device: {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"model: {args.model or 'embedded SmolLM2-135M-Instruct'}; {args.clients} clients, {args.duration:g} s; "
          f"budgets think {args.think_budget} / solution {args.solution_budget}, temperature 0.7")
    print()
    print("| path | requests | req/s | output tok/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| server (HTTP, streaming) | {served['requests']} | {served['requests'] / served['seconds']:.2f} | "
          f"{rate:.1f} | {percentile(served['ttft'], 0.5):.2f} / {percentile(served['ttft'], 0.99):.2f} | "
          f"{percentile(served['latency'], 0.5):.2f} / {percentile(served['latency'], 0.99):.2f} | "
          f"{len(served['errors'])} |")
    print(f"| LLM.chat in-process, waves of {args.clients} | {base['requests']} | "
          f"{base['requests'] / base['seconds']:.2f} | {base_rate:.1f} | - | - | 0 |")
    print()
    print()
    print("| path | engine steps | of them prefills | mean sequences per step | engine busy (s in steps / wall s) |")
    print("| --- | --- | --- | --- | --- |")
    for label, run in (("server", served), ("in-process", base)):
        e = run["engine"]
        print(f"| {label} | {e['steps']:.0f} | {e['prefills']:.0f} | {e['sequences'] / max(e['steps'], 1):.1f} | "
              f"{e['seconds']:.1f} / {run['seconds']:.1f} = {e['seconds'] / run['seconds']:.2f} |")
    print()
    print(f"server / in-process output tokens/s: {rate / base_rate:.2f}"
          + (f"; mean latency {statistics.mean(served['latency']):.2f} s" if served["latency"] else ""))
    if served["errors"]:
        print("errors:", *sorted(set(served["errors"]))[:5], sep="\n  ")


if __name__ == "__main__":
    main()
