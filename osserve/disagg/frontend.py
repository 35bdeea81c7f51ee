"""`osserve frontend`: the OpenAI-compatible server (osserve/server, unchanged: routes, protocol, Harmony)
over a RemoteEngine that routes each request to registered prefill / decode / both workers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from osserve.config import EngineConfig
from osserve.disagg.remote_engine import FrontendSettings, RemoteEngine

logger = logging.getLogger("osserve.disagg.frontend")


def create_frontend_app(
    settings: FrontendSettings,
    *,
    model: str = "",
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue_len: int | None = None,
    tokenizer: Any = None,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The server app with a RemoteEngine; discovery starts with the app."""
    from osserve.server.app import create_app, served_name
    from osserve.server.tokenizer import load_tokenizer

    config = EngineConfig.from_dict({"model": model, "served_model_name": served_model_name})
    tok = tokenizer or load_tokenizer()
    engine = RemoteEngine(settings, served_name(config), tok)
    app = create_app(
        config,
        api_key=api_key,
        max_queue_len=max_queue_len,
        tokenizer=tok,
        engine=engine,
        shutdown_timeout=shutdown_timeout,
    )
    app.state.remote_engine = engine
    return app


def serve_app(app: FastAPI, host: str, port: int, log_level: str) -> int:
    """Run the frontend until SIGTERM / SIGINT, draining first (osserve/server/lifecycle.py). Workers come and
    go, so a deployment with none ready answers 503 rather than exiting."""
    from osserve.server.lifecycle import serve_app as run

    logger.info("osserve frontend listening on http://%s:%d", host, port)
    return run(app, host, port, log_level, exit_on_engine_death=False)
