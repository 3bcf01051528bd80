"""The HTTP server: OpenAI-compatible routes with budgets, a token-level /generate for RL trainers,
pause / resume / update_weights, Prometheus /metrics. `build_app(loop, config)` makes the FastAPI app
over a running EngineLoop; `python -m elastic_decode.serve` starts one with uvicorn.

The app is its parts, over one `ServerState` (state.py): the guard in front of every route (guard.py:
API key, shutdown gate, body bound), the error handlers (errors.py), and the routers: the OpenAI routes
(openai_routes.py), the trainers' and operators' routes (rollout_routes.py), and the routes RL frameworks
drive their rollout servers with: SGLang's native API (sglang_routes.py: slime, AReaL, sglang-router) and
vLLM's RL routes (vllm_routes.py: SkyRL, TRL's AsyncGRPO).
"""
from __future__ import annotations

from fastapi import FastAPI

from ..engine.loop import EngineLoop
from . import openai_routes, rollout_routes, sglang_routes, vllm_routes
from .errors import install_handlers
from .guard import Guard
from .state import ServerConfig, ServerState

__all__ = ["ServerConfig", "build_app"]


def build_app(loop: EngineLoop, config: ServerConfig) -> FastAPI:
    state = ServerState(loop, config)
    app = FastAPI(title="elastic_decode", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state  # the shutdown drain (shutdown.py) and tests reach it here
    install_handlers(app)
    app.include_router(openai_routes.router(state))
    app.include_router(rollout_routes.router(state))
    app.include_router(sglang_routes.router(state))
    app.include_router(vllm_routes.router(state))
    app.add_middleware(Guard, state=state)
    return app
