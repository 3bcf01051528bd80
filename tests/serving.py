"""Helpers of the server tests: uvicorn on a free loopback port, plain HTTP calls, waiting on the loop."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

from engines import engine_kwargs  # noqa: F401 - the servers' engines are the tests' usual one

MODEL = "tiny"  # the served model name of the tests




@contextlib.contextmanager
def serving(loop, config):
    """uvicorn on a free loopback port in a thread; yields the base URL; stops it after."""
    import uvicorn

    from elastic_decode.serve.app import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(loop, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def post(url: str, path: str, body, headers: dict | None = None, raw: bytes | None = None):
    """(status, JSON reply) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(url: str, path: str, headers: dict | None = None):
    """(status, raw body) of a GET."""
    request = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def empty(loop, wait: float = 10.0) -> bool:
    """The engine holds no sequence and no KV block (waiting up to `wait` seconds for the loop)."""
    deadline = time.monotonic() + wait
    while True:
        s = loop.stats()
        if s["running"] == s["waiting"] == s["kv_blocks_used"] == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def in_thread(fn):
    """Run fn on a thread; returns (thread, box): box["value"] or box["error"] once it ends."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for_tokens(loop, at_least: int = 1) -> None:
    start = loop.metrics.output_tokens
    deadline = time.monotonic() + 30
    while loop.metrics.output_tokens < start + at_least and time.monotonic() < deadline:
        time.sleep(0.01)
