"""What every endpoint shares: the server state, admission (model name, readiness, queue limit), one
request's engine stream with its metrics, Server-Sent Events that abort on disconnect, and the mapping of
request options onto SamplingParams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from osserve.config import EngineConfig
from osserve.engine.async_engine import EngineClient, EngineDeadError, EngineNotReadyError
from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import OutputKind, SamplingParams
from osserve.server.errors import APIError, from_value_error
from osserve.server.metrics import ServerMetrics
from osserve.server.protocol import _Sampling
from osserve.structured import StructuredOutput

logger = logging.getLogger("osserve.server")

# Sees each request just before it reaches the engine and may adjust its SamplingParams:
# (endpoint, request body, prompt token ids, params). Tests use it to attach logits processors that force
# the model's output, and to look at the rendered prompt.
RequestHook = Callable[[str, BaseModel, list[int], SamplingParams], None]
T = TypeVar("T")


class ServerState:
    def __init__(
        self,
        config: EngineConfig,
        engine: EngineClient,
        served_model_name: str,
        api_key: str | None = None,
        max_queue_len: int | None = None,
        request_hook: RequestHook | None = None,
    ):
        self.config = config
        self.engine = engine
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.max_queue_len = max_queue_len
        self.request_hook = request_hook
        self.created = int(time.time())
        self.num_in_flight = 0
        self.url: str | None = None
        self.metrics = ServerMetrics(lambda: self.engine.stats, lambda: self.num_in_flight)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server serves {self.served_model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def require_ready(self) -> None:
        state = self.engine.state
        if state == "loading":
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                "server_error",
                None,
                "model_loading",
                {"Retry-After": "5"},
            )
        if state == "dead":
            raise APIError(
                503, f"the engine has stopped: {self.engine.error}", "server_error", None, "engine_dead"
            )

    def queue_depth(self) -> int:
        """Requests accepted but not running: beyond the batch cap, or waiting in the engine (e.g. for KV)."""
        beyond_cap = self.num_in_flight - self.config.max_batch_size
        # NOTE: engine stats lag a step behind (an aborted request may still count as waiting), so they
        # are capped by what this server has in flight.
        waiting = min(self.engine.num_pending + self.engine.stats.get("num_waiting", 0), self.num_in_flight)
        return max(beyond_cap, waiting)

    def admit(self) -> None:
        self.require_ready()
        if self.max_queue_len is not None and self.queue_depth() >= self.max_queue_len:
            raise APIError(
                503,
                f"server busy: {self.max_queue_len} request(s) already queued; retry later",
                "server_error",
                None,
                "queue_full",
                {"Retry-After": "1"},
            )

    def apply_hook(
        self, endpoint: str, request: BaseModel, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        if self.request_hook is not None:
            self.request_hook(endpoint, request, prompt_ids, params)

    def submit(
        self,
        endpoint: str,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        prompt_param: str = "messages",
    ) -> EngineStream:
        """Queue a request in the engine; raises APIError (400 / 503) if it is refused."""
        self.admit()
        try:
            it = self.engine.add_request(request_id, prompt_ids, params, prompt)
        except (EngineNotReadyError, EngineDeadError):
            self.require_ready()
            raise
        except ValueError as e:
            raise from_value_error(e, _prompt_names(prompt_param), prompt_param) from None
        self.num_in_flight += 1
        logger.debug(
            "request %s (%s): %d prompt tokens, max_tokens %s, n %d",
            request_id,
            endpoint,
            len(prompt_ids),
            params.max_tokens,
            params.n,
        )
        return EngineStream(self, request_id, it, len(prompt_ids), prompt_param)


def _prompt_names(prompt_param: str) -> dict[str, str]:
    # Engine errors about the prompt name it `prompt` / `prompt_token_ids`; the client calls it otherwise.
    return {"prompt": prompt_param, "prompt_token_ids": prompt_param}


class EngineStream:
    """One request's outputs. `aclose()` (idempotent) aborts it if unfinished and records its metrics."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        it: AsyncIterator[RequestOutput],
        num_prompt_tokens: int,
        prompt_param: str = "messages",
    ):
        self.state = state
        self.prompt_param = prompt_param
        self.request_id = request_id
        self._it = it
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_reasons: dict[int, str] = {}
        self.finished = False
        # Why the server closed the stream before the engine finished: "abort" (the client left), or
        # "stop" (a stop string the server matched).
        self.close_reason = "abort"
        self._closed = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._it.__anext__()
        except EngineDeadError as e:
            raise APIError(503, f"the engine has stopped: {e}", "server_error", None, "engine_dead") from None
        except ValueError as e:
            # NOTE: some checks (the KV cache must hold prompt + max_tokens) run only when the engine thread
            # admits the request, so they arrive here rather than from add_request.
            self.finished = True
            raise from_value_error(e, _prompt_names(self.prompt_param), self.prompt_param) from None
        n = sum(len(o.token_ids) for o in out.outputs)
        if n and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.num_output_tokens += n
        self.num_cached_tokens = out.num_cached_tokens
        for o in out.outputs:
            if o.finish_reason is not None:
                self.finish_reasons[o.index] = o.finish_reason
        if out.error:
            raise APIError(500, f"generation failed: {out.error}", "server_error")
        self.finished = out.finished
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.state.engine.abort(self.request_id)
        await self._it.aclose()  # type: ignore[attr-defined]
        self.state.num_in_flight -= 1
        e2e = time.monotonic() - self.arrival
        ttft = self.first_token_time - self.arrival if self.first_token_time is not None else None
        reasons = list(self.finish_reasons.values()) if self.finished else [self.close_reason]
        self.state.metrics.observe_request(self.num_prompt_tokens, self.num_output_tokens, ttft, e2e, reasons)
        logger.debug(
            "request %s %s (%s): %d output tokens in %.3fs",
            self.request_id,
            "finished" if self.finished else "closed early",
            ",".join(reasons),
            self.num_output_tokens,
            e2e,
        )


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


class EventStream(StreamingResponse):
    """Server-Sent Events over `body`. Whatever ends the response (last event, client disconnect, an error),
    `on_close` runs, so an abandoned request is aborted and its KV blocks are freed at once."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        # X-Accel-Buffering: proxies such as nginx must pass events on as they come.
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        except OSError:
            pass  # the client went away mid-send
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._on_close()


# -------------------------------------------------------------------------------------------------------
# Request options -> SamplingParams

_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


def sampling_params(
    req: _Sampling,
    max_tokens: int | None,
    *,
    n: int = 1,
    stop: list[str] | str | None = None,
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    param_names: dict[str, str] | None = None,
    detokenize: bool = True,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """`detokenize` False: the endpoint reads token ids only (Harmony parsing), so the engine's client
    side makes no text."""
    kwargs: dict[str, Any] = {
        "detokenize": detokenize,
        "n": n,
        "max_tokens": max_tokens,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "logprobs": logprobs,
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "output_kind": OutputKind.DELTA,
        "structured": structured,
    }
    for name in _OPTIONAL:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        names = {name: name for name in (*_OPTIONAL, "n", "stop", "min_tokens", "max_tokens", "logprobs")}
        raise from_value_error(e, {**names, **(param_names or {})}) from None


def usage_requested(req: _Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
