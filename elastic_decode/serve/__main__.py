"""Serve a model over HTTP: OpenAI-compatible chat and completions with thinking and solution budgets,
a token-level /generate for RL trainers, pause / resume / update_weights, Prometheus /metrics.

Binds to 127.0.0.1 unless --host says otherwise. With an API key (ELASTIC_DECODE_API_KEY, --api-key-file,
or --api-key, which `ps` shows), every route but /health needs "Authorization: Bearer <key>". SIGTERM or
Ctrl-C stops taking requests, gives the ones in flight --shutdown-timeout seconds, aborts the rest
cleanly and exits 0.

example:
  python -m elastic_decode.serve --port 8000
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "2+2?"}], "thinking_budget": 64, "solution_budget": 32}'
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ..cli import OneLineErrorParser, add_engine_arguments, engine_kwargs
from ..errors import ElasticDecodeError

log = logging.getLogger("elastic_decode.serve")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m elastic_decode.serve", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--served-model-name", default=None,
                   help="the name /v1/models lists and requests give as \"model\" (default: the model's folder "
                        "or file name)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=os.environ.get("ELASTIC_DECODE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$ELASTIC_DECODE_API_KEY, else no key). A key given here is visible in `ps`: prefer the "
                        "environment variable or --api-key-file")
    s.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from the first line of this file")
    s.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, how long requests in flight may take to finish before they are "
                        "aborted (default 5)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lim = p.add_argument_group("request bounds (a request past one gets a 400 naming the field)")
    lim.add_argument("--max-n", type=int, default=64, help="completions per prompt (default 64)")
    lim.add_argument("--max-tokens", type=int, default=None,
                     help="cap on max_tokens, also applied when a request gives none (default: the context window)")
    lim.add_argument("--max-prompts", type=int, default=1024, help="prompts per /v1/completions or /generate call")
    lim.add_argument("--max-body-mb", type=float, default=16, help="JSON request bodies (default 16 MiB)")
    lim.add_argument("--max-weights-gb", type=float, default=None,
                     help="safetensors bodies posted to /update_weights (default: what the model's weights take "
                          "in float64, the largest valid body)")
    b = p.add_argument_group("default budgets (for requests that name none: routers such as sglang-router 0.3.2 "
                             "drop SGLang's custom_params on /generate, docs/serving.md)")
    b.add_argument("--thinking-budget", type=int, default=None, metavar="T",
                   help="thinking tokens before the end-of-thinking marker is forced (default: none)")
    b.add_argument("--solution-budget", type=int, default=None, metavar="S",
                   help="solution tokens after the marker, with --thinking-budget (default: none)")
    e = p.add_argument_group("engine")
    add_engine_arguments(e, backend=True)
    e.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    e.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together (default 256)")
    e.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV cache size (default: what the GPU has left after a profile; 1 GiB on CPU)")
    return p


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as e:
        raise ElasticDecodeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _served_name(model: str | None, embedded) -> str:
    """A checkpoint folder's name, a .gguf file's stem, or the embedded model's (quantisation dropped)."""
    if model is None:
        return embedded().stem.split(".")[0]
    path = Path(model).expanduser()
    return path.stem if path.is_file() else path.resolve().name


def _api_key(args) -> str | None:
    """The key from --api-key-file, else --api-key / $ELASTIC_DECODE_API_KEY; None: no key."""
    if args.api_key_file is None:
        return args.api_key or None
    try:
        key = Path(args.api_key_file).expanduser().read_text().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise ElasticDecodeError(f"--api-key-file {args.api_key_file}: cannot read a key from it "
                                 f"({getattr(e, 'strerror', None) or 'empty or not text'})") from None
    if not key:
        raise ElasticDecodeError(f"--api-key-file {args.api_key_file}: its first line is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from ..engine import EngineLoop
        from ..llm import LLM
        from ..models.loader import embedded_gguf_path
        from .app import ServerConfig, build_app
        from .shutdown import DrainingServer
    except ImportError as e:
        print(f"error: serving needs FastAPI and uvicorn ({e.name} is missing): "
              "pip install 'elastic_decode[serve]'", file=sys.stderr)
        return 2
    try:
        for name in ("max_n", "max_prompts"):
            if getattr(args, name) < 1:
                raise ElasticDecodeError(f"--{name.replace('_', '-')} must be at least 1")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ElasticDecodeError("--max-tokens must be at least 1")
        if any(b is not None and b < 0 for b in (args.thinking_budget, args.solution_budget)):
            raise ElasticDecodeError("--thinking-budget and --solution-budget must be >= 0")
        if args.solution_budget is not None and args.thinking_budget is None:
            raise ElasticDecodeError("--solution-budget needs --thinking-budget (it counts after the marker)")
        if args.max_body_mb <= 0 or (args.max_weights_gb is not None and args.max_weights_gb <= 0):
            raise ElasticDecodeError("--max-body-mb and --max-weights-gb must be positive")
        if not args.shutdown_timeout >= 0:
            raise ElasticDecodeError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
        api_key = _api_key(args)
        if args.data_parallel_size != 1:
            raise ElasticDecodeError("the server drives one engine (tensor-parallel if asked): for data parallelism "
                                     "start one server per replica (each on its own --port) behind a load balancer")
        if not 0 <= args.port <= 65535:
            raise ElasticDecodeError(f"--port must be in [0, 65535], got {args.port}")
        _check_port(args.host, args.port)
        if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            log.warning("listening on %s with no --api-key: anyone who can reach it can use it", args.host)
        start = time.perf_counter()
        llm = LLM(args.model, **engine_kwargs(args, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                              kv_cache_memory_gb=args.kv_cache_memory_gb))
        name = args.served_model_name or _served_name(args.model, embedded_gguf_path)
        config = ServerConfig(model_name=name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                              max_weights_bytes=None if args.max_weights_gb is None
                              else int(args.max_weights_gb * 2**30),
                              max_n=args.max_n, max_prompts=args.max_prompts, max_tokens=args.max_tokens,
                              shutdown_timeout_s=args.shutdown_timeout, thinking_budget=args.thinking_budget,
                              solution_budget=args.solution_budget)
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    engine = llm.engine
    log.info("loaded %s in %.1f s: %s on %s, %d KV blocks (%d tokens), context window %d", name,
             time.perf_counter() - start, engine.dtype, engine.device, engine.num_kv_blocks,
             engine.kv_capacity_tokens, engine.window)
    with EngineLoop(engine) as loop:
        app = build_app(loop, config)
        server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5), app.state.server)
        try:
            server.run()  # returns after the drain on SIGTERM / Ctrl-C (shutdown.py)
        finally:
            app.state.server.close()
    m = loop.metrics
    aborted = sum(m.aborts.values())
    print(f"served {sum(m.requests_finished.values())} requests ({m.output_tokens} tokens, {m.forced_ends} forced "
          f"ends, {aborted} aborted) in {m.steps} engine steps, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
