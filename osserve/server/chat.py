"""POST /v1/chat/completions: messages -> Harmony prompt -> engine -> parsed reasoning / content / tool calls,
as one JSON body or as chat.completion.chunk events."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from osserve.engine.outputs import CompletionOutput
from osserve.harmony.formats import ResponseFormat, parse_response_format
from osserve.harmony.parse import Delta, OutputParser, coalesce
from osserve.harmony.render import render_chat
from osserve.harmony.tools import parse_chat_tools
from osserve.server.constraints import request_constraint
from osserve.server.logprobs import chat_logprob
from osserve.server.openai_errors import bad_request, from_value_error
from osserve.server.prompts import check_prompt_length, check_unicode, prompt_budget
from osserve.server.protocol import ChatCompletionRequest
from osserve.server.serving import (
    EngineStream,
    ServerState,
    continuous_usage,
    sampling_params,
    usage_requested,
)
from osserve.server.sse import ClientDisconnected, chat_error_events, done_event, sse

logger = logging.getLogger("osserve.server")
EFFORTS = ("low", "medium", "high")


class StopMatcher:
    """Stop strings over the answer text: text that might begin a stop string is held back until it
    cannot; the text before the first stop string is all that is ever released."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max(len(s) for s in stops) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ChoiceState:
    """One choice: its parser, stop strings, what it has said, and its logprobs."""

    def __init__(self, index: int, state: ServerState, stops: list[str], top_logprobs: int | None):
        self.index = index
        self.state = state
        self.parser = OutputParser(state.tokenizer)
        self.stop = StopMatcher(stops) if stops else None
        self.top_logprobs = top_logprobs
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self._content_index = 0  # message index of the text the stop matcher holds back

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: CompletionOutput) -> tuple[list[Delta], list[dict[str, Any]]]:
        """Deltas (coalesced) and content-token logprobs of one engine output of this choice."""
        deltas: list[Delta] = []
        logprobs: list[dict[str, Any]] = []
        for j, token in enumerate(out.token_ids):
            if self.done:
                break
            self.num_tokens += 1
            new = self._filter(self.parser.process(token))
            if self.top_logprobs is not None and out.logprobs and any(d.kind == "content" for d in new):
                logprobs.append(chat_logprob(self.state.tokenizer, token, out.logprobs[j], self.top_logprobs))
            deltas += new
        if out.finish_reason is not None and not self.done:
            deltas += self._filter(self.parser.end())
            if not self.done:
                deltas += self._flush()
                self.finish(out.finish_reason)
        deltas = coalesce(deltas)
        for d in deltas:
            if d.kind == "reasoning":
                self.reasoning.append(d.text)
            elif d.kind == "content":
                self.content.append(d.text)
        self.logprobs += logprobs
        return deltas, logprobs

    def _filter(self, deltas: list[Delta]) -> list[Delta]:
        if self.stop is None:
            return deltas
        out: list[Delta] = []
        for d in deltas:
            if d.kind != "content":
                out += self._flush() + [d]
                continue
            self._content_index = d.message_index
            text, hit = self.stop.feed(d.text)
            if text:
                out.append(Delta("content", text, d.message_index))
            if hit:
                self.finish("stop")
                break
        return out

    def _flush(self) -> list[Delta]:
        text = self.stop.flush() if self.stop is not None else ""
        return [Delta("content", text, self._content_index)] if text else []

    def finish(self, engine_reason: str) -> None:
        self.finish_reason = self.parser.finish_reason(engine_reason)
        if self.parser.error:
            self.state.metrics.parse_errors.inc()
            logger.warning("choice %d: %s", self.index, self.parser.error)

    def message(self) -> dict[str, Any]:
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.parser.tool_calls
        ]
        reasoning = "".join(self.reasoning) if self.reasoning else None
        content = "".join(self.content) if self.content or not calls else None
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "reasoning": reasoning,
            "reasoning_content": reasoning,
            "refusal": None,
        }
        if calls:
            msg["tool_calls"] = calls
        return msg


def delta_dict(d: Delta) -> dict[str, Any]:
    if d.kind == "reasoning":
        return {"reasoning": d.text, "reasoning_content": d.text}
    if d.kind == "content":
        return {"content": d.text}
    call: dict[str, Any] = {"index": d.tool_call_index, "function": {"arguments": d.text}}
    if d.tool_call_id is not None:
        call.update(id=d.tool_call_id, type="function")
        call["function"]["name"] = d.tool_name
    return {"tool_calls": [call]}


def _effort(req: ChatCompletionRequest) -> str | None:
    if req.reasoning_effort is not None:
        return req.reasoning_effort
    args = req.chat_template_args or {}
    effort = args.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort.lower() not in EFFORTS):
        raise bad_request(
            f"chat_template_args.reasoning_effort must be one of {list(EFFORTS)}, got {effort!r}",
            "chat_template_args.reasoning_effort",
        )
    return effort


def _usage(stream: EngineStream, choices: list[ChoiceState]) -> dict[str, Any]:
    completion = sum(c.num_tokens for c in choices)
    reasoning = sum(c.parser.num_reasoning_tokens for c in choices)
    return {
        "prompt_tokens": stream.num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": stream.num_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": stream.num_cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _dump(models: list[Any] | None) -> list[dict[str, Any]] | None:
    """Request models back to the plain dicts Harmony reads (only what the client sent)."""
    return [m.model_dump(exclude_unset=True) for m in models] if models is not None else None


def _dump_one(model: Any) -> dict[str, Any] | None:
    return model.model_dump() if model is not None else None


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    state.check_model(req.model)
    state.require_ready()
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        response_format = parse_response_format(_dump_one(req.response_format))
        tools = parse_chat_tools(_dump(req.tools))
    except ValueError as e:
        raise from_value_error(e) from None
    max_seq_len = state.max_seq_len
    budget = prompt_budget(max_seq_len, max_tokens)
    prompt_ids = await state.prompts.run(_render, req, response_format, budget)
    check_prompt_length(len(prompt_ids), budget, max_seq_len, max_tokens, "messages")
    structured = await request_constraint(
        response_format, tools, req.tool_choice, max_tokens, "tools[{}].function.parameters"
    )
    tok = state.tokenizer
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(
        req,
        max_tokens,
        n=req.n,
        stop_token_ids=tok.stop_token_ids_for_assistant(),
        logprobs=top,
        param_names={
            "max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
            "logprobs": "top_logprobs",
        },
        detokenize=False,
        structured=structured,
    )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    state.apply_hook("chat.completions", req, prompt_ids, params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = state.submit("chat.completions", request_id, prompt_ids, params)
    choices = [ChoiceState(i, state, stops, top) for i in range(req.n)]
    head = {"id": request_id, "created": int(time.time()), "model": state.served_model_name}
    if req.stream:
        return state.event_stream(_stream(stream, choices, head, req), stream.aclose, chat_error_events)
    try:
        await state.finish_or_stop(raw, _consume(stream, choices))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await stream.aclose()
    body = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": c.index,
                "message": c.message(),
                "finish_reason": c.finish_reason,
                "logprobs": {"content": c.logprobs} if top is not None else None,
            }
            for c in choices
        ],
        "usage": _usage(stream, choices),
    }
    _count_reasoning(state, choices)
    return JSONResponse(body)


def _render(
    req: ChatCompletionRequest, response_format: ResponseFormat | None, stop_after: int | None
) -> list[int]:
    """The prompt (on a worker thread): the whole request is checked for text that is not Unicode first."""
    check_unicode(req.model_dump(exclude_unset=True))
    return render_chat(
        _dump(req.messages),
        _dump(req.tools),
        req.tool_choice,
        _effort(req),
        response_format=response_format,
        stop_after=stop_after,
    )


def _count_reasoning(state: ServerState, choices: list[ChoiceState]) -> None:
    state.metrics.reasoning_tokens.inc(sum(c.parser.num_reasoning_tokens for c in choices))


async def _consume(stream: EngineStream, choices: list[ChoiceState]) -> None:
    async for out in stream:
        for o in out.outputs:
            choices[o.index].feed(o)
        if all(c.done for c in choices):
            stream.close_reason = "stop"  # stop strings ended every choice before the engine did
            return


async def _stream(
    stream: EngineStream, choices: list[ChoiceState], head: dict[str, Any], req: ChatCompletionRequest
) -> AsyncIterator[str]:
    with_usage, continuous = usage_requested(req), continuous_usage(req)
    chunk_head = {**head, "object": "chat.completion.chunk"}

    def usage() -> dict[str, Any]:
        if continuous:
            return {"usage": _usage(stream, choices)}
        return {"usage": None} if with_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**chunk_head, "choices": [choice], **usage()})

    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for out in stream:
        sent = False
        for o in out.outputs:
            c = choices[o.index]
            if c.done:
                continue
            deltas, logprobs = c.feed(o)
            for d in deltas:
                lp = {"content": logprobs} if logprobs and d.kind == "content" else None
                logprobs = [] if lp else logprobs
                yield chunk(c.index, delta_dict(d), logprobs=lp)
                sent = True
            if c.done:
                yield chunk(c.index, {}, c.finish_reason)
                sent = True
        if continuous and not sent:
            # Tokens that show no text yet (a Harmony header): the count still tells the client they came.
            yield sse({**chunk_head, "choices": [], **usage()})
        if all(c.done for c in choices):
            stream.close_reason = "stop"
            break
    _count_reasoning(stream.state, choices)
    if with_usage:
        yield sse({**chunk_head, "choices": [], "usage": _usage(stream, choices)})
    yield done_event()
