"""POST /v1/completions: the legacy text API. The prompt is plain text (no Harmony), so this endpoint is
for raw-model use: benchmarks, prefix-cache checks, clients that render their own prompts."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from osserve.engine.outputs import RequestOutput
from osserve.server.logprobs import completion_logprobs
from osserve.server.openai_errors import APIError, bad_request
from osserve.server.prompts import check_prompt_length, check_unicode, prompt_budget
from osserve.server.protocol import CompletionRequest
from osserve.server.serving import (
    EngineStream,
    ServerState,
    continuous_usage,
    sampling_params,
    usage_requested,
)
from osserve.server.sse import ClientDisconnected, chat_error_events, done_event, sse


def _prompts(tok: Any, req: CompletionRequest, stop_after: int | None) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt (on a worker thread). A text prompt's encoding stops once it has
    more than `stop_after` tokens."""
    check_unicode(req.model_dump(exclude_unset=True))
    prompt = req.prompt
    if isinstance(prompt, str):
        return [(tok.encode(prompt, stop_after=stop_after), prompt)]
    if isinstance(prompt[0], int):
        return [(list(prompt), tok.decode(prompt, skip_special_tokens=False))]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((tok.encode(p, stop_after=stop_after), p))
        else:
            out.append((list(p), tok.decode(p, skip_special_tokens=False)))
    return out


class _Choice:
    def __init__(self, index: int, prompt_text: str, echo: bool):
        self.index = index
        self.text = prompt_text if echo else ""
        self.pending_echo = prompt_text if echo else ""
        self.token_ids: list[int] = []
        self.logprobs: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        self.finish_reason: str | None = None


async def _merge(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: EngineStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    state.check_model(req.model)
    state.require_ready()
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (other than best_of = n)", "best_of")
    max_seq_len = state.max_seq_len
    budget = prompt_budget(max_seq_len, req.max_tokens)
    prompts = await state.prompts.run(_prompts, state.tokenizer, req, budget, param="prompt")
    for ids, _ in prompts:
        check_prompt_length(len(ids), budget, max_seq_len, req.max_tokens, "prompt")
    params = sampling_params(req, req.max_tokens, n=req.n, stop=req.stop, logprobs=req.logprobs)
    state.apply_hook("completions", req, prompts[0][0], params)  # the first prompt, if several
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams: list[EngineStream] = []
    try:
        for i, (ids, text) in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(state.submit("completions", rid, ids, params, text, prompt_param="prompt"))
    except APIError:
        for s in streams:
            await s.aclose()
        raise
    choices = [
        _Choice(i * req.n + j, text, req.echo) for i, (_, text) in enumerate(prompts) for j in range(req.n)
    ]
    head = {"id": request_id, "created": int(time.time()), "model": state.served_model_name}

    async def close() -> None:
        for s in streams:
            await s.aclose()

    if req.stream:
        return state.event_stream(_stream(state, req, streams, choices, head), close, chat_error_events)
    try:
        await state.finish_or_stop(raw, _consume(state, req, streams, choices))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await close()
    body = {
        **head,
        "object": "text_completion",
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": c.logprobs if req.logprobs is not None else None,
            }
            for c in choices
        ],
        "usage": _usage(streams),
    }
    return JSONResponse(body)


def _usage(streams: list[EngineStream]) -> dict[str, Any]:
    prompt = sum(s.num_prompt_tokens for s in streams)
    completion = sum(s.num_output_tokens for s in streams)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.num_cached_tokens for s in streams)},
    }


def _apply(state: ServerState, req: CompletionRequest, choices: list[_Choice], i: int, out: RequestOutput):
    """Fold one engine output into its choices; yield (choice, new text, new logprobs) per completion."""
    for o in out.outputs:
        c = choices[i * req.n + o.index]
        lps = None
        if req.logprobs is not None and o.logprobs:
            lps = completion_logprobs(state.tokenizer, o.token_ids, o.logprobs, req.logprobs, len(c.text))
            for key, values in lps.items():
                c.logprobs[key] += values
        c.text += o.text
        c.token_ids += o.token_ids
        if o.finish_reason is not None:
            c.finish_reason = o.finish_reason
        text, c.pending_echo = c.pending_echo + o.text, ""
        yield c, text, lps


async def _consume(
    state: ServerState, req: CompletionRequest, streams: list[EngineStream], choices: list[_Choice]
):
    async with contextlib.aclosing(_merge(streams)) as merged:
        async for i, out in merged:
            for _ in _apply(state, req, choices, i, out):
                pass


async def _stream(
    state: ServerState,
    req: CompletionRequest,
    streams: list[EngineStream],
    choices: list[_Choice],
    head: dict[str, Any],
) -> AsyncIterator[str]:
    with_usage, continuous = usage_requested(req), continuous_usage(req)
    chunk_head = {**head, "object": "text_completion"}

    def usage() -> dict[str, Any]:
        if continuous:
            return {"usage": _usage(streams)}
        return {"usage": None} if with_usage else {}

    # NOTE: aclosing, so that a client gone mid-stream stops the per-prompt pumps before the streams close.
    async with contextlib.aclosing(_merge(streams)) as merged:
        async for i, out in merged:
            sent = False
            for c, text, lps in _apply(state, req, choices, i, out):
                if not text and c.finish_reason is None:
                    continue
                choice = {
                    "index": c.index,
                    "text": text,
                    "logprobs": lps,
                    "finish_reason": c.finish_reason,
                }
                yield sse({**chunk_head, "choices": [choice], **usage()})
                sent = True
            if continuous and not sent:  # tokens without text (yet): the count says they came
                yield sse({**chunk_head, "choices": [], **usage()})
    if with_usage:
        yield sse({**chunk_head, "choices": [], "usage": _usage(streams)})
    yield done_event()
