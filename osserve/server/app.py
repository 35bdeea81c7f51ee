"""The FastAPI app: routes over the async engine, API-key check, request metrics, lifespan.

`create_app(config)` builds everything; the engine starts loading when the app starts, and requests get 503
until it is ready (GET /health tells). `request_hook` lets tests adjust SamplingParams per request. How the
process runs it (graceful drain on SIGTERM, exit when the engine dies) is osserve/server/lifecycle.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from osserve import __version__
from osserve.config import EngineConfig
from osserve.distributed.launcher import make_engine
from osserve.engine.async_engine import AsyncEngine, EngineClient
from osserve.engine.engine import EngineCore
from osserve.server.chat import create_chat_completion
from osserve.server.completions import create_completion
from osserve.server.metrics import CONTENT_TYPE
from osserve.server.openai_errors import PROPAGATE, APIError, install_handlers, internal_error
from osserve.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ResponsesRequest
from osserve.server.responses import create_response
from osserve.server.serving import RequestHook, ServerState
from osserve.server.tokenizer import load_tokenizer

logger = logging.getLogger("osserve.server")

_ENDPOINTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/health",
    "/metrics",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (503, "Loading, overloaded or shutting down (Retry-After), or the engine stopped"),
    )
}
# The generation endpoints answer one JSON body, or Server-Sent Events with "stream": true.
_GENERATION = {
    **_ERRORS,
    200: {
        "description": "The result; with stream: true, Server-Sent Events (data: lines, ending in [DONE] "
        "or, for /v1/responses, in response.completed / response.incomplete / response.failed)",
        "content": {
            "application/json": {},
            # One Server-Sent Event: its data line (JSON, or [DONE]) and, for /v1/responses, its event name.
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            },
        },
    },
}


def served_name(config: EngineConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model:
        return config.model
    from osserve.model.default import DEFAULT_NAME

    return DEFAULT_NAME


class _Gate:
    """Pure ASGI middleware (streaming-safe): the API-key check on /v1/*, a count of every response by
    endpoint and status, and the last line of defence: any exception a route let through, BaseException
    included (a panic in a native library), becomes OpenAI's error object."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.state.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
                error = APIError(
                    401,
                    "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                await error.response()(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        except PROPAGATE:
            raise
        except BaseException as e:  # noqa: BLE001 - see the class docstring
            error = internal_error(e, f"serving {scope.get('method')} {path}")
            if not started:  # else the response is cut short, as nothing else can be done
                await error.response()(scope, receive, send_status)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        """`Authorization: Bearer KEY`; the scheme is case-insensitive (RFC 9110)."""
        assert self.state.api_key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.state.api_key.encode()
                )
        return False


def create_app(
    config: EngineConfig,
    *,
    api_key: str | None = None,
    max_queue_len: int | None = None,
    request_hook: RequestHook | None = None,
    tokenizer: Any = None,
    core_factory: Callable[[], tuple[EngineCore, str]] | None = None,
    engine: EngineClient | None = None,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The server app for one model. The engine loads in the background once the app starts, built by
    `make_engine` (one rank, or rank 0 of a parallel engine); `core_factory`, if given, replaces it (tests use
    it to hold or fail the load).

    `engine`: any EngineClient (the disaggregated frontend passes one that routes to remote workers);
    default: a ProcessEngine (engine loop in a child process) or an AsyncEngine in this process.
    `shutdown_timeout`: seconds requests in flight get to finish once a drain starts (`ServerState.drain`)."""
    if engine is None and core_factory is None and _engine_in_own_process(config):
        from osserve.engine.engine_process import ProcessEngine

        engine = ProcessEngine(config, tokenizer or load_tokenizer(), make_engine)
    elif engine is None:
        factory = core_factory or functools.partial(make_engine, config)
        engine = AsyncEngine(config, tokenizer or load_tokenizer(), factory)
    state = ServerState(config, engine, served_name(config), api_key, max_queue_len, request_hook)
    state.shutdown_timeout = shutdown_timeout

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        logger.info(
            "loading model %s (served as %r) ...",
            config.model or "<embedded default>",
            state.served_model_name,
        )
        engine.start()
        announce = asyncio.ensure_future(_announce_ready(state))
        try:
            yield
        finally:
            announce.cancel()
            logger.info("shutting down the engine")
            await run_in_threadpool(engine.shutdown)

    app = FastAPI(
        title="osserve",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible API for gpt-oss models. Errors use OpenAI's error object.",
    )
    app.state.server = state
    install_handlers(app)
    app.add_middleware(_Gate, state=state)

    @app.post("/v1/chat/completions", responses=_GENERATION, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/responses", responses=_GENERATION, tags=["openai"])
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(state, body, request)

    @app.post("/v1/completions", responses=_GENERATION, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.get("/v1/models", responses=_ERRORS, tags=["openai"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS, tags=["openai"])
    async def get_model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return _model_card(state)

    @app.get(
        "/health", responses={503: {"description": "Loading, draining, or the engine stopped"}}, tags=["ops"]
    )
    async def health() -> JSONResponse:
        return _health(state)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _engine_in_own_process(config: EngineConfig) -> bool:
    """`engine_process`, or its default: on for an engine on CUDA, where the host is the limit (a parallel
    engine's rank 0 then lives in that process and starts the other ranks from there)."""
    if config.engine_process is not None:
        return config.engine_process
    from osserve.engine.factory import resolve_device

    try:
        return resolve_device(config).type == "cuda"
    except (ValueError, RuntimeError):
        return False  # the engine reports the bad device itself


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "osserve",
        "root": state.config.model or state.served_model_name,
        "max_model_len": state.max_seq_len,
    }


def _health(state: ServerState) -> JSONResponse:
    engine = state.engine
    stats = engine.stats
    body: dict[str, Any] = {
        "status": "draining" if state.draining else engine.state,
        "model": state.served_model_name,
        "engine": {
            "state": engine.state,
            "num_running": stats.get("num_running", 0),
            "num_waiting": stats.get("num_waiting", 0),
            "num_steps": stats.get("num_steps", 0),
            "kv_cache": stats.get("kv", {}),
        },
        "server": {"num_in_flight": state.num_in_flight, "queue_depth": state.queue_depth()},
    }
    # An engine over other processes describes them (the disaggregated frontend's workers).
    body.update(engine.health_extra())
    if engine.state == "ready" and not state.draining:
        return JSONResponse(body)
    try:
        state.require_ready()
    except APIError as e:
        body.update(e.body())
        return JSONResponse(body, status_code=503, headers=e.headers)
    return JSONResponse(body, status_code=503)


async def _announce_ready(state: ServerState) -> None:
    while state.engine.state == "loading":
        await asyncio.sleep(0.1)
    if state.engine.state == "ready":
        where = f" at {state.url}" if state.url else ""
        logger.info("ready: serving %r%s (OpenAI API under /v1)", state.served_model_name, where)
    else:
        logger.error("could not load the model: %s", state.engine.error)
