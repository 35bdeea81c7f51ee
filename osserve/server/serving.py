"""What every endpoint shares: the server state, admission (model name, readiness, capacity, draining), one
request's engine stream with its metrics, Server-Sent Events that abort on disconnect and end with an error
event when anything fails (or the server shuts down), and the mapping of request options onto SamplingParams.

Admission counts what the engine holds, exactly: the sequences (a request with n choices is n) of every
request accepted and not yet finished, against `max_batch_size + max_queue_len`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from osserve.config import EngineConfig
from osserve.engine.async_engine import EngineClient, EngineDeadError, EngineNotReadyError
from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import OutputKind, SamplingParams
from osserve.server.metrics import ServerMetrics
from osserve.server.openai_errors import (
    APIError,
    bad_request,
    draining_error,
    from_value_error,
    shutdown_error,
)
from osserve.server.prompts import PromptWorkers
from osserve.server.protocol import _Sampling
from osserve.server.sse import EventStream, Stopped, chat_error_events, until_disconnect
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
        self.num_in_flight = 0  # requests (engine streams) accepted and not closed
        self.num_sequences = 0  # their sequences the engine has not finished: what admission counts
        self.url: str | None = None
        self.metrics = ServerMetrics(lambda: self.engine.stats, lambda: self.num_in_flight)
        self.prompts = PromptWorkers()
        # Shutdown: `draining` refuses new requests; `stopping` (set once the grace period is over) ends
        # those still running with an error.
        self.draining = False
        self.shutdown_timeout = 30.0
        self.stopping = asyncio.Event()
        # Set (from any thread) when the process must drain and exit with status 1 (osserve/server/lifecycle.py).
        self.fatal: str | None = None

    def fail(self, reason: str) -> None:
        """Ask the process running this app to drain and exit with status 1 (e.g. a deployment that gave up
        restarting a worker)."""
        self.fatal = reason

    @property
    def max_seq_len(self) -> int | None:
        # An engine over other processes (the disaggregated frontend) knows its workers' limit once one is up.
        return self.engine.max_seq_len or self.config.max_seq_len

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
        if self.draining:
            raise draining_error()
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
        """Sequences accepted beyond the batch cap (queued in the engine until a running one finishes)."""
        return max(0, self.num_sequences - self.config.max_batch_size)

    def admit(self, num_sequences: int) -> None:
        """Refuse a request of `num_sequences` (its n) the engine has no room for: 503 queue_full when the
        running and queued sequences would pass max_batch_size + max_queue_len."""
        self.require_ready()
        if self.max_queue_len is None:
            return
        capacity = self.config.max_batch_size + self.max_queue_len
        if num_sequences > capacity:
            raise bad_request(
                f"n is {num_sequences}; this server holds at most {capacity} sequences at once "
                f"(max_batch_size {self.config.max_batch_size} + max_queue_len {self.max_queue_len})",
                "n",
            )
        if self.num_sequences + num_sequences > capacity:
            raise APIError(
                503,
                f"server busy: {self.num_sequences} sequence(s) running or queued, room for {capacity} "
                f"(max_batch_size {self.config.max_batch_size} + max_queue_len {self.max_queue_len}); "
                "retry later",
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
        self.admit(params.n)
        try:
            it = self.engine.add_request(request_id, prompt_ids, params, prompt)
        except (EngineNotReadyError, EngineDeadError):
            self.require_ready()
            raise
        except ValueError as e:
            raise from_value_error(e, _prompt_names(prompt_param), prompt_param) from None
        self.num_in_flight += 1
        self.num_sequences += params.n
        logger.debug(
            "request %s (%s): %d prompt tokens, max_tokens %s, n %d",
            request_id,
            endpoint,
            len(prompt_ids),
            params.max_tokens,
            params.n,
        )
        return EngineStream(self, request_id, it, len(prompt_ids), prompt_param, params.n)

    async def drain(self) -> None:
        """Stop taking requests, give those in flight `shutdown_timeout` seconds, then end the rest (streams
        with an error event, others with a 503). Returns once none is left (or 2 s after ending them)."""
        self.draining = True
        logger.info(
            "draining: no new requests; %d in flight get %g s to finish",
            self.num_in_flight,
            self.shutdown_timeout,
        )
        deadline = time.monotonic() + self.shutdown_timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            logger.warning(
                "ending %d request(s) still running after %g s", self.num_in_flight, self.shutdown_timeout
            )
            self.stopping.set()
            deadline = time.monotonic() + 2.0
            while self.num_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    def event_stream(
        self,
        body: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        on_error: Callable[[APIError], list[str]] = chat_error_events,
    ) -> EventStream:
        """A streaming response that ends with `on_error`'s events on an error or at shutdown."""
        return EventStream(
            body, on_close, on_error, self.stopping, lambda: shutdown_error(self.shutdown_timeout)
        )

    async def finish_or_stop(self, request: Request, work: Awaitable[T]) -> T:
        """Run `work` (a non-streaming request); ClientDisconnected if the client goes away first, a 503 if
        the server's shutdown grace period ends first."""
        try:
            return await until_disconnect(request, work, self.stopping)
        except Stopped:
            raise shutdown_error(self.shutdown_timeout) from None


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
        num_sequences: int = 1,
    ):
        self.state = state
        self._num_sequences = num_sequences  # given back to admission once the engine is done with them
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
            self._release()
            raise APIError(500, f"generation failed: {out.error}", "server_error")
        self.finished = out.finished
        if self.finished:
            self._release()
        return out

    def _release(self) -> None:
        self.state.num_sequences -= self._num_sequences
        self._num_sequences = 0

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.state.engine.abort(self.request_id)
        self._release()
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


def continuous_usage(req: _Sampling) -> bool:
    """vLLM's `stream_options.continuous_usage_stats` (with include_usage): every chunk carries the usage so
    far, and engine outputs that add tokens but no text get a chunk of their own (`choices: []`)."""
    return usage_requested(req) and bool(req.stream_options and req.stream_options.continuous_usage_stats)
