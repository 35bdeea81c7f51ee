"""POST /v1/responses: the Responses API. Each Harmony message of the output becomes one output item
(reasoning, message with output_text, function_call); streaming sends the API's typed events, numbered."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from osserve.harmony.formats import ResponseFormat, parse_text_format
from osserve.harmony.parse import Delta
from osserve.harmony.render import render_responses
from osserve.harmony.tools import parse_responses_tools
from osserve.server.chat import ChoiceState
from osserve.server.constraints import request_constraint
from osserve.server.openai_errors import APIError, bad_request, from_value_error
from osserve.server.prompts import check_prompt_length, check_unicode, prompt_budget
from osserve.server.protocol import ResponsesRequest
from osserve.server.serving import EngineStream, ServerState, sampling_params
from osserve.server.sse import ClientDisconnected, sse

_PREFIX = {"reasoning": "rs", "content": "msg", "tool_call": "fc"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Deltas in, Responses events out; keeps the output items for the final response object."""

    def __init__(self, snapshot: dict[str, Any]):
        self.snapshot = snapshot
        self.seq = -1
        self.items: list[dict[str, Any]] = []
        self._open_index: int | None = None  # the Harmony message index of the open item
        self._text = ""
        self._logprobs: list[dict[str, Any]] = []

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": type, "sequence_number": self.seq, **fields}

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return {**self.snapshot, "status": status, "output": [dict(i) for i in self.items], **extra}

    def start(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self.response("in_progress")),
            self.event("response.in_progress", response=self.response("in_progress")),
        ]

    def feed(self, deltas: list[Delta], logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for d in deltas:
            if d.message_index != self._open_index:
                events += self.close("completed") + self._open(d)
            item = self.items[-1]
            where = {"item_id": item["id"], "output_index": len(self.items) - 1}
            self._text += d.text
            if d.kind == "tool_call":
                if d.text:
                    events.append(self.event("response.function_call_arguments.delta", **where, delta=d.text))
            elif d.kind == "reasoning":
                events.append(
                    self.event("response.reasoning_text.delta", **where, content_index=0, delta=d.text)
                )
            else:
                lps, logprobs = logprobs, []
                self._logprobs += lps
                events.append(
                    self.event(
                        "response.output_text.delta", **where, content_index=0, delta=d.text, logprobs=lps
                    )
                )
        return events

    def _open(self, d: Delta) -> list[dict[str, Any]]:
        self._open_index, self._text, self._logprobs = d.message_index, "", []
        item_id = _new_id(_PREFIX[d.kind])
        if d.kind == "tool_call":
            item = {
                "id": item_id,
                "type": "function_call",
                "call_id": d.tool_call_id,
                "name": d.tool_name,
                "arguments": "",
                "status": "in_progress",
            }
        elif d.kind == "reasoning":
            item = {"id": item_id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "content": [],
                "status": "in_progress",
            }
        self.items.append(item)
        where = {"item_id": item_id, "output_index": len(self.items) - 1}
        events = [
            self.event("response.output_item.added", output_index=where["output_index"], item=dict(item))
        ]
        if d.kind != "tool_call":
            events.append(
                self.event("response.content_part.added", **where, content_index=0, part=self._part(""))
            )
        return events

    def _part(self, text: str) -> dict[str, Any]:
        if self.items[-1]["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(self._logprobs)}

    def error_events(self, error: APIError) -> list[str]:
        """How a stream ends on an error: an `error` event, then `response.failed` with the response."""
        events = [
            self.event("error", code=error.code, message=error.message, param=error.param),
            self.event(
                "response.failed",
                response=self.response("failed", error={"code": error.code, "message": error.message}),
            ),
        ]
        return [sse(e, e["type"]) for e in events]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Finish the open item, if any."""
        if self._open_index is None:
            return []
        self._open_index = None
        item = self.items[-1]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if item["type"] == "function_call":
            item["arguments"] = self._text
            events = [
                self.event(
                    "response.function_call_arguments.done", **where, name=item["name"], arguments=self._text
                )
            ]
        else:
            part = self._part(self._text)
            item["content"] = [part]
            if item["type"] == "reasoning":
                done = self.event("response.reasoning_text.done", **where, content_index=0, text=self._text)
            else:
                done = self.event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=self._text,
                    logprobs=part["logprobs"],
                )
            events = [
                done,
                self.event("response.content_part.done", **where, content_index=0, part=dict(part)),
            ]
        return events + [
            self.event("response.output_item.done", output_index=where["output_index"], item=dict(item))
        ]


def _usage(stream: EngineStream, choice: ChoiceState) -> dict[str, Any]:
    return {
        "input_tokens": stream.num_prompt_tokens,
        "input_tokens_details": {"cached_tokens": stream.num_cached_tokens},
        "output_tokens": choice.num_tokens,
        "output_tokens_details": {"reasoning_tokens": choice.parser.num_reasoning_tokens},
        "total_tokens": stream.num_prompt_tokens + choice.num_tokens,
    }


def _check_supported(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise bad_request(
            "previous_response_id is not supported: this server stores no responses; send the "
            "whole conversation in input",
            "previous_response_id",
        )
    if req.background:
        raise bad_request("background responses are not supported", "background")


async def create_response(state: ServerState, req: ResponsesRequest, raw: Request) -> Response:
    state.check_model(req.model)
    state.require_ready()
    _check_supported(req)
    effort = req.reasoning.effort if req.reasoning is not None else None
    tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools is not None else None
    text_format = (
        req.text.format.model_dump() if req.text is not None and req.text.format is not None else None
    )
    try:
        response_format = parse_text_format(text_format)
        parsed_tools = parse_responses_tools(tools)
    except ValueError as e:
        raise from_value_error(e, None, "input") from None
    max_seq_len = state.max_seq_len
    budget = prompt_budget(max_seq_len, req.max_output_tokens)
    prompt_ids = await state.prompts.run(_render, req, effort, tools, response_format, budget, param="input")
    check_prompt_length(len(prompt_ids), budget, max_seq_len, req.max_output_tokens, "input")
    structured = await request_constraint(
        response_format, parsed_tools, req.tool_choice, req.max_output_tokens, "tools[{}].parameters"
    )
    tok = state.tokenizer
    params = sampling_params(
        req,
        req.max_output_tokens,
        stop_token_ids=tok.stop_token_ids_for_assistant(),
        logprobs=req.top_logprobs,
        param_names={"max_tokens": "max_output_tokens", "logprobs": "top_logprobs"},
        detokenize=False,
        structured=structured,
    )
    state.apply_hook("responses", req, prompt_ids, params)
    response_id = _new_id("resp")
    stream = state.submit("responses", response_id, prompt_ids, params, prompt_param="input")
    choice = ChoiceState(0, state, [], req.top_logprobs)
    builder = ResponseBuilder(_snapshot(state, req, response_id, effort, tools or [], text_format))
    if req.stream:
        return state.event_stream(_stream(stream, choice, builder), stream.aclose, builder.error_events)
    try:
        await state.finish_or_stop(raw, _consume(stream, choice, builder))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await stream.aclose()
    state.metrics.reasoning_tokens.inc(choice.parser.num_reasoning_tokens)
    return JSONResponse(_final(builder, stream, choice)[1])


def _render(
    req: ResponsesRequest,
    effort: str | None,
    tools: list[dict[str, Any]] | None,
    text_format: ResponseFormat | None,
    stop_after: int | None,
) -> list[int]:
    """The prompt (on a worker thread): the whole request is checked for text that is not Unicode first."""
    check_unicode(req.model_dump(exclude_unset=True))
    items = req.input if isinstance(req.input, str) else [i.model_dump(exclude_unset=True) for i in req.input]
    reasoning = {"effort": effort} if effort else None
    return render_responses(
        items,
        req.instructions,
        tools,
        req.tool_choice,
        reasoning,
        text_format=text_format,
        stop_after=stop_after,
    )


def _snapshot(
    state: ServerState,
    req: ResponsesRequest,
    response_id: str,
    effort: str | None,
    tools: list[dict[str, Any]],
    text_format: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": state.served_model_name,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "top_logprobs": req.top_logprobs,
        "tool_choice": req.tool_choice or "auto",
        "tools": tools,
        "reasoning": {"effort": effort or "medium", "summary": None},
        "text": {"format": text_format or {"type": "text"}},
        "truncation": req.truncation or "disabled",
        "user": req.user,
        "store": False,
        "background": False,
        "previous_response_id": None,
        "usage": None,
    }


def _final(
    builder: ResponseBuilder, stream: EngineStream, choice: ChoiceState
) -> tuple[list[dict[str, Any]], dict]:
    """The closing events and the final response object."""
    cut = choice.finish_reason == "length"
    events = builder.close("incomplete" if cut else "completed")
    extra: dict[str, Any] = {"usage": _usage(stream, choice), "completed_at": int(time.time())}
    if cut:
        extra["incomplete_details"] = {"reason": "max_output_tokens"}
    response = builder.response("incomplete" if cut else "completed", **extra)
    events.append(builder.event("response.incomplete" if cut else "response.completed", response=response))
    return events, response


async def _consume(stream: EngineStream, choice: ChoiceState, builder: ResponseBuilder) -> None:
    async for out in stream:
        builder.feed(*choice.feed(out.outputs[0]))
        if choice.done:
            return


async def _stream(stream: EngineStream, choice: ChoiceState, builder: ResponseBuilder) -> AsyncIterator[str]:
    for event in builder.start():
        yield sse(event, event["type"])
    async for out in stream:
        for event in builder.feed(*choice.feed(out.outputs[0])):
            yield sse(event, event["type"])
        if choice.done:
            break
    stream.state.metrics.reasoning_tokens.inc(choice.parser.num_reasoning_tokens)
    for event in _final(builder, stream, choice)[0]:
        yield sse(event, event["type"])
