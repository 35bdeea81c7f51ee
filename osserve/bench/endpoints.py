"""One streamed request to an OpenAI-compatible endpoint (chat, completions, responses), timed per SSE event.

Nothing here raises for a failed request: connection errors, HTTP 4xx / 5xx, error events, streams that end
early and timeouts all come back as a `RequestRecord` with success False and an error that says what
happened."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from osserve.bench.aggregate import RequestRecord

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
# Chat delta fields that carry generated text (reasoning is named differently by different servers).
_CHAT_OUTPUT_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls", "refusal")


def endpoint_kind(endpoint: str) -> str:
    """'chat' | 'completions' | 'responses' from a short name or an API path such as /v1/chat/completions."""
    name = endpoint.strip().strip("/")
    if name in ENDPOINTS:
        return name
    for kind, path in sorted(ENDPOINTS.items(), key=lambda kv: -len(kv[1])):
        if ("/" + name).endswith(path.removeprefix("/v1")):
            return kind
    raise ValueError(
        f"--endpoint must be one of {', '.join(ENDPOINTS)} or its path ({', '.join(ENDPOINTS.values())}); "
        f"got {endpoint!r}"
    )


@dataclass
class RequestSpec:
    """What to send: a prompt (completions) or messages (chat, responses) and the sampling fields."""

    kind: str
    url: str
    model: str | None
    output_len: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    ignore_eos: bool = True
    temperature: float | None = None
    extra_body: dict[str, Any] | None = None
    # vLLM's stream_options.continuous_usage_stats (osserve, vLLM and SGLang take it): the token count in every
    # chunk, so that tokens showing no text can still be timed.
    continuous_usage: bool = True

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"stream": True}
        if self.model is not None:
            body["model"] = self.model
        options: dict[str, Any] = {"include_usage": True}
        if self.continuous_usage:
            options["continuous_usage_stats"] = True
        if self.kind == "completions":
            body.update(prompt=self.prompt, max_tokens=self.output_len, stream_options=options)
        elif self.kind == "chat":
            body.update(messages=self.messages, max_completion_tokens=self.output_len, stream_options=options)
        else:
            body.update(input=self.messages, max_output_tokens=self.output_len)
        if self.ignore_eos:
            # Extra fields that osserve and vLLM accept: exactly output_len tokens, whatever the model says.
            body.update(ignore_eos=True, min_tokens=self.output_len)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.extra_body or {})
        return body


@dataclass
class StreamResult:
    text: str  # the visible output (content; reasoning too where no content came), for multi-turn history
    reasoning: str


class _Parser:
    """Reads one SSE event; says whether it carried output, whether it ended the stream, and the usage."""

    def __init__(self, kind: str):
        self.kind = kind
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.done = False
        self.finished = False  # a finish_reason arrived (chat / completions)
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None
        self.new_tokens = False  # the last event's usage counted more output tokens than any before

    def feed(self, event: str | None, data: str) -> bool:
        """True if this event carried generated output. Raises _StreamError on an error event."""
        self.new_tokens = False
        if data == "[DONE]":
            self.done = True
            return False
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise _StreamError(f"unexpected SSE data: {data[:200]}")
        if (
            obj.get("error") is not None
            or event == "error"
            or obj.get("type") in ("error", "response.failed")
        ):
            raise _StreamError(f"error event in stream: {_error_message(obj)}")
        if self.kind == "responses":
            return self._responses(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            before = self.output_tokens or 0
            self.output_tokens = usage.get("completion_tokens", self.output_tokens)
            self.new_tokens = (self.output_tokens or 0) > before
        carried = False
        for choice in obj.get("choices") or []:
            if choice.get("finish_reason") is not None:
                self.finished = True
            if self.kind == "completions":
                piece = choice.get("text") or ""
                carried |= bool(piece)
                self.text.append(piece)
                continue
            delta = choice.get("delta") or {}
            carried |= any(delta.get(f) for f in _CHAT_OUTPUT_FIELDS)
            self.text.append(delta.get("content") or "")
            self.reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
        return carried

    def _responses(self, obj: dict[str, Any]) -> bool:
        kind = obj.get("type", "")
        if kind in ("response.completed", "response.incomplete"):
            usage = (obj.get("response") or {}).get("usage") or {}
            self.prompt_tokens = usage.get("input_tokens")
            self.output_tokens = usage.get("output_tokens")
            self.done = self.finished = True
            return False
        if kind.endswith(".delta") and obj.get("delta"):
            if kind == "response.output_text.delta":
                self.text.append(obj["delta"])
            elif "reasoning" in kind:
                self.reasoning.append(obj["delta"])
            return True
        return False


class _StreamError(Exception):
    pass


def _error_message(obj: Any) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or {"message": ...})."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg is None and isinstance(err.get("response"), dict):
                return _error_message(err["response"])
            if msg is not None:
                return str(msg)
        elif isinstance(err, str):
            return err
    return json.dumps(obj)[:300]


async def _sse_lines(response: httpx.Response):
    """Lines of an SSE stream. NOTE: the SSE spec ends lines only at CR, LF or CRLF; httpx's aiter_lines
    also splits at U+2028, U+0085 and the like, which JSON strings may carry raw (model text)."""
    buf = b""
    async for chunk in response.aiter_bytes():
        buf += chunk
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


async def _events(response: httpx.Response):
    """(event name, data) of each Server-Sent Event, as each completes."""
    event: str | None = None
    data: list[str] = []
    async for line in _sse_lines(response):
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue  # a comment (keep-alive ping)
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
    if data:
        yield event, "\n".join(data)


async def send_request(
    client: httpx.AsyncClient,
    spec: RequestSpec,
    record: RequestRecord,
    t0: float,
    timeout_s: float,
    tokenizer: Any = None,
) -> StreamResult | None:
    """Send `spec`, fill `record` (times relative to `t0`, perf_counter seconds). None if it failed."""
    parser = _Parser(spec.kind)
    start = time.perf_counter()
    record.start_time = start - t0
    last: float | None = None
    token_times: list[float] = []  # events whose usage counted new tokens (continuous usage)
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("POST", spec.url, json=spec.payload()) as response,
        ):
            record.http_status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")
                try:
                    message = _error_message(json.loads(body))
                except ValueError:
                    message = body.strip()[:300] or response.reason_phrase
                record.error = f"HTTP {response.status_code}: {message}"
                return None
            async for event, data in _events(response):
                now = time.perf_counter()
                # NOTE: the usage chunk after the finish reason (include_usage) counts no new token.
                was_finished = parser.finished
                if parser.feed(event, data):
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                if parser.new_tokens and not was_finished:
                    token_times.append(now)
                if parser.done:
                    record.e2el = now - start
                    break
    except TimeoutError:
        record.error = f"timeout: no complete response after {timeout_s:g} s"
        return None
    except _StreamError as e:
        record.error = str(e)
        return None
    except httpx.ConnectError as e:
        record.error = f"connection failed: {e or type(e).__name__} ({spec.url})"
        return None
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        record.error = f"stream dropped: {e or type(e).__name__}"
        return None
    except json.JSONDecodeError as e:
        record.error = f"bad SSE data: {e}"
        return None
    except Exception as e:  # noqa: BLE001 - whatever goes wrong is this request's failure, never the run's
        record.error = f"{type(e).__name__}: {e}"
        return None
    if not parser.done:
        record.error = (
            "stream dropped: the response ended without its final event ([DONE] / response.completed)"
        )
        return None
    # NOTE: a stream can finish without one visible delta (a random-weight model whose Harmony header never
    # ends, or max_tokens spent on the header). With continuous usage its timings come from the events that
    # counted new tokens (`timed_from` "first_token"); without, they stay None and the aggregates skip it.
    if record.ttft is None and token_times:
        record.ttft = token_times[0] - start
        record.itl = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
        record.timed_from = "first_token"
    text, reasoning = "".join(parser.text), "".join(parser.reasoning)
    record.prompt_tokens = parser.prompt_tokens
    record.output_tokens = parser.output_tokens
    if record.output_tokens is None:
        # NOTE: a server without stream usage: count what was streamed (misses tokens that show no text).
        record.output_tokens_source = "tokenizer"
        record.output_tokens = (
            len(tokenizer.encode(reasoning + text)) if tokenizer is not None else len(record.itl) + 1
        )
    record.success = True
    return StreamResult(text=text, reasoning=reasoning)
