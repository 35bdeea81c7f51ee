"""The client side of the engine: packed step outputs (token ids) -> per-request RequestOutputs.

The engine core works in token ids only. Everything that turns its tokens into what a user reads happens
here, in the process that serves the user: grouping samples into requests, detokenization, stop strings
(a hit ends the sample here and the caller aborts it in the engine), the holdback of text that may begin
a stop string, logprob formatting, delta / cumulative / final-only outputs, timing.

Two halves, so that neither waits for the other:
- `process(outputs)` runs once per engine step (on the thread that receives the step): per entry it appends
  the token to its sample and marks the request as having news; it does no per-token text work.
- `make_output(state)` runs when the request's consumer asks (its stream, on the event loop; or LLMEngine):
  it takes every token that arrived since the last call, at once, and does the text work for them. A consumer
  that fell behind thus gets one output for many steps (one SSE event per visit, not one per token).
Each token is handled once, so the cost is linear in the output length.

The two halves run on different threads without a lock: `process` appends a token before it marks the
request, and `make_output` clears the mark before it reads the tokens, so no token is ever missed; a finish is
set after the sample's last token is appended and read before the tokens are.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from osserve.engine.outputs import (
    FINISH_REASONS,
    CompletionOutput,
    EngineCoreOutputs,
    Finish,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from osserve.sampling_params import OutputKind, SamplingParams

LogprobEntry = dict[int, Logprob]


class SampleState:
    """One sample of a request: tokens as they arrived, and what its outputs have carried so far."""

    __slots__ = (
        "request",
        "index",
        "handle",
        "token_ids",
        "raw_logprobs",
        "finish",
        "taken",
        "num_output",
        "detok",
        "text",
        "sent_text",
        "sent_tokens",
        "logprobs",
        "cumulative_logprob",
        "finish_reason",
        "stop_reason",
        "handoff",
        "sent_finish",
    )

    def __init__(self, request: RequestState, index: int, handle: int, detok: Any):
        self.request = request
        self.index = index
        self.handle = handle
        self.token_ids: list[int] = []  # appended by process()
        self.raw_logprobs: list[tuple[list[int], list[float], int]] = []  # (ids, values, rank) per token
        self.finish = Finish.NONE  # set by process() after the sample's last token
        self.taken = 0  # tokens make_output has handled
        self.num_output = 0  # tokens that are part of the output (a stop string may end it early)
        self.detok = detok
        self.text = ""
        self.sent_text = 0
        self.sent_tokens = 0
        self.logprobs: list[LogprobEntry] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.handoff: Any = None
        self.sent_finish = False  # an output carried the finish_reason


class RequestState:
    """One user request on the client side."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
        first_handle: int,
        tokenizer: Any,
    ):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.prompt = prompt
        self.first_handle = first_handle
        detok = params.detokenize and tokenizer is not None
        self.samples = [
            SampleState(
                self,
                i,
                first_handle + i,
                tokenizer.detokenizer(params.skip_special_tokens) if detok else None,
            )
            for i in range(params.n)
        ]
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[tuple[int, Any]] = []  # (start, PromptLogprobs) as they arrive
        self.sent_prompt_logprobs = False
        self.error: BaseException | None = None
        self.finished = False
        # Samples the engine must abort (a stop string ended them here); the caller sends the abort.
        self.abort_handles: list[int] = []
        # Set by process() when something arrived that make_output has not seen yet.
        self.has_news = False
        # The consumer's wake-up (an asyncio.Event's set, called on its loop) and that loop.
        self.loop: Any = None
        self.event: Any = None

    @property
    def handles(self) -> list[int]:
        return [s.handle for s in self.samples]


class OutputProcessor:
    def __init__(self, tokenizer: Any = None, stream_interval: int = 1):
        self.tokenizer = tokenizer
        # Streaming outputs wait until at least this many new tokens (or the end) are there.
        self.stream_interval = stream_interval
        self.requests: dict[str, RequestState] = {}
        self._samples: dict[int, SampleState] = {}
        self._by_first: dict[int, RequestState] = {}

    # -- requests --------------------------------------------------------------------------------------
    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
        first_handle: int,
    ) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        state = RequestState(request_id, prompt_token_ids, params, prompt, first_handle, self.tokenizer)
        self.requests[request_id] = state
        self._by_first[first_handle] = state
        for s in state.samples:
            self._samples[s.handle] = s
        return state

    def remove(self, state: RequestState) -> None:
        if self.requests.get(state.request_id) is state:
            del self.requests[state.request_id]
        self._by_first.pop(state.first_handle, None)
        for s in state.samples:
            self._samples.pop(s.handle, None)

    def restore(
        self, state: RequestState, output_token_ids: list[int], num_sent_chars: int, cumulative_logprob: float
    ) -> None:
        """Continue a request whose first outputs were produced and sent elsewhere (disaggregated serving):
        its text so far is rebuilt, and only what the client has not been sent yet goes out."""
        s = state.samples[0]
        s.token_ids = list(output_token_ids)
        s.taken = s.num_output = s.sent_tokens = len(output_token_ids)
        if s.detok is not None:
            s.text = s.detok.add_many(output_token_ids) if output_token_ids else ""
        s.sent_text = min(num_sent_chars, len(s.text))
        s.cumulative_logprob = cumulative_logprob
        if state.params.logprobs is not None:
            s.logprobs = [{} for _ in output_token_ids]
            s.raw_logprobs = [([], [], 0) for _ in output_token_ids]
        state.sent_prompt_logprobs = True
        state.first_token_time = time.monotonic()

    # -- the step half ---------------------------------------------------------------------------------
    def process(self, outs: EngineCoreOutputs) -> list[RequestState]:
        """Take one step's outputs; return the requests that have news and had none pending before (those
        whose consumer must be woken)."""
        woken: list[RequestState] = []
        samples = self._samples
        n = len(outs)
        if n:
            lp: dict[int, int] = {}
            if outs.lp_index is not None and len(outs.lp_index):
                lp = {int(i): j for j, i in enumerate(outs.lp_index.tolist())}
            now = time.monotonic()
            finishes = outs.finish.tolist()
            for i, (h, t) in enumerate(zip(outs.handles.tolist(), outs.tokens.tolist(), strict=True)):
                s = samples.get(h)
                if s is None:
                    continue
                if lp and i in lp:
                    j = lp[i]
                    s.raw_logprobs.append(
                        (outs.lp_ids[j].tolist(), outs.lp_values[j].tolist(), int(outs.lp_ranks[j]))
                    )
                if t >= 0:
                    s.token_ids.append(t)
                f = finishes[i]
                if f:
                    if f == Finish.HANDOFF:
                        s.handoff = outs.handoff.get(h)
                    s.finish = Finish(f)
                r = s.request
                if r.first_token_time is None and t >= 0:
                    r.first_token_time = now
                if not r.has_news:
                    r.has_news = True
                    woken.append(r)
        for h, num_cached in outs.num_cached:
            s = samples.get(h)
            if s is not None and s.index == 0:
                s.request.num_cached_tokens = num_cached
        for p in outs.prompt_logprobs:
            s = samples.get(p.handle)
            if s is not None and s.index == 0:
                r = s.request
                r.prompt_logprobs.append((p.start, p))
                if not r.has_news:
                    r.has_news = True
                    woken.append(r)
        for h, message in outs.errors:
            r = self._by_first.get(h)
            if r is not None:
                self.fail(r, ValueError(message), woken)
        return woken

    def abort(self, state: RequestState) -> None:
        """End a request the client aborted: its unfinished samples finish "abort" with what arrived."""
        for s in state.samples:
            if s.finish == Finish.NONE:
                s.finish = Finish.ABORT
        state.has_news = True

    def fail(
        self, state: RequestState, error: BaseException, woken: list[RequestState] | None = None
    ) -> None:
        """End a request with an error (raised by its stream once its earlier outputs are out)."""
        state.error = error
        if not state.has_news:
            state.has_news = True
            if woken is not None:
                woken.append(state)

    def error_output(self, state: RequestState) -> RequestOutput:
        """The final output of a request that failed (finish_reason "error", `error` the message)."""
        state.finished = True
        outs = [CompletionOutput(s.index, "", [], None, None, finish_reason="error") for s in state.samples]
        return RequestOutput(
            state.request_id, state.prompt, state.prompt_token_ids, None, outs, True, error=str(state.error)
        )

    # -- the consumer half -----------------------------------------------------------------------------
    def make_output(self, state: RequestState) -> RequestOutput | None:
        """Everything that arrived for `state` since the last call, as one output (None: nothing to say yet,
        e.g. a final-only request that has not finished)."""
        state.has_news = False
        if state.finished:
            return None
        p = state.params
        kind = p.output_kind
        interval = self.stream_interval
        for s in state.samples:
            if s.finish_reason is None:
                self._take(state, s)
        finished = all(s.finish_reason is not None for s in state.samples)
        handoff = next((s.handoff for s in state.samples if s.handoff is not None), None)
        if kind == OutputKind.FINAL_ONLY and not finished and handoff is None:
            return None
        if (
            interval > 1
            and not finished
            and any(s.sent_tokens for s in state.samples)
            and max(s.num_output - s.sent_tokens for s in state.samples) < interval
        ):
            return None  # what arrived goes out with the next output
        prompt_logprobs = self._prompt_logprobs(state)
        news = (
            handoff is not None
            or prompt_logprobs is not None
            or any(
                s.num_output > s.sent_tokens or (s.finish_reason is not None) > s.sent_finish
                for s in state.samples
            )
        )
        if not news:
            return None
        holdback = max((len(x) for x in p.stop), default=1) - 1
        outs = []
        for s in state.samples:
            done = s.finish_reason is not None
            text_end = len(s.text) if done else max(s.sent_text, len(s.text) - holdback)
            tok_end = s.num_output
            if kind == OutputKind.DELTA:
                text = s.text[s.sent_text : text_end]
                toks = s.token_ids[s.sent_tokens : tok_end]
                lps = s.logprobs[s.sent_tokens : tok_end] if p.logprobs is not None else None
            else:
                text, toks = s.text[:text_end], s.token_ids[:tok_end]
                lps = list(s.logprobs) if p.logprobs is not None else None
            s.sent_text, s.sent_tokens = text_end, tok_end
            s.sent_finish = done
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=toks,
                    cumulative_logprob=s.cumulative_logprob if p.logprobs is not None else None,
                    logprobs=lps,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        out = RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outs,
            finished=finished or handoff is not None,
            num_cached_tokens=state.num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=state.arrival_time,
                first_token_time=state.first_token_time,
                finished_time=time.monotonic() if finished else None,
            ),
        )
        if handoff is not None:
            s0 = state.samples[0]
            handoff.num_sent_chars = s0.sent_text
            handoff.cumulative_logprob = s0.cumulative_logprob
            out.extra["handoff"] = handoff
        state.finished = out.finished
        return out

    def _take(self, state: RequestState, s: SampleState) -> None:
        """Handle the sample's new tokens: text, stop strings, logprobs, finish."""
        p = state.params
        finish = s.finish  # NOTE: read before the tokens (see the module docstring)
        end = len(s.token_ids)
        detok, stops = s.detok, p.stop
        for j in range(s.taken, end):
            t = s.token_ids[j]
            s.num_output = j + 1
            if p.logprobs is not None and j < len(s.raw_logprobs):
                s.logprobs.append(self._logprob_entry(t, s.raw_logprobs[j], p.logprobs, detok is not None))
                s.cumulative_logprob += s.raw_logprobs[j][1][0]
            if detok is None:
                continue
            before = len(s.text)
            s.text += detok.add(t)
            if (
                stops
                and s.num_output >= p.min_tokens
                and (j + 1 < end or finish in (Finish.NONE, Finish.LENGTH))
            ):
                hit = _find_stop(s, p, before)
                if hit is not None:
                    s.finish_reason, s.stop_reason = "stop", hit
                    s.taken = end
                    if finish == Finish.NONE:
                        state.abort_handles.append(s.handle)
                    return
        s.taken = end
        if finish == Finish.HANDOFF or finish == Finish.NONE:
            return
        s.finish_reason = FINISH_REASONS[finish]
        if finish == Finish.STOP_TOKEN and s.token_ids:
            s.stop_reason = s.token_ids[-1]

    def _logprob_entry(
        self, token: int, raw: tuple[list[int], list[float], int], k: int, decode: bool
    ) -> LogprobEntry:
        ids, values, rank = raw
        tok = self.tokenizer if decode else None

        def text(t: int) -> str | None:
            return tok.decode([t], skip_special_tokens=False) if tok is not None else None

        entry = {token: Logprob(values[0], rank, text(token))}
        for j in range(1, min(len(ids), 1 + k)):
            if ids[j] >= 0:
                entry.setdefault(ids[j], Logprob(values[j], j, text(ids[j])))
        return entry

    def _prompt_logprobs(self, state: RequestState) -> list[LogprobEntry | None] | None:
        p = state.params
        if p.prompt_logprobs is None or (p.output_kind == OutputKind.DELTA and state.sent_prompt_logprobs):
            return None
        got = sum(len(x.ranks) for _, x in state.prompt_logprobs)
        if got + 1 < len(state.prompt_token_ids):
            return None
        entries: list[LogprobEntry | None] = [None]
        decode = p.detokenize and self.tokenizer is not None
        for _, x in sorted(state.prompt_logprobs, key=lambda e: e[0]):
            ids, values, ranks = x.ids.tolist(), x.logprobs.tolist(), x.ranks.tolist()
            for i in range(len(ranks)):
                entries.append(
                    self._logprob_entry(ids[i][0], (ids[i], values[i], ranks[i]), p.prompt_logprobs, decode)
                )
        state.sent_prompt_logprobs = True
        return entries


def _find_stop(s: SampleState, p: SamplingParams, text_before: int) -> str | None:
    """Find a stop string ending in the newest token's text; cut the text there."""
    assert p.stop
    longest = max(len(x) for x in p.stop)
    start = max(0, text_before - longest + 1)
    best: tuple[int, str] | None = None
    for x in p.stop:
        i = s.text.find(x, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, x)
    if best is None:
        return None
    i, x = best
    s.text = s.text[: i + len(x)] if p.include_stop_str_in_output else s.text[:i]
    return x


def wake(states: list[RequestState]) -> None:
    """Wake the consumers of `states`: one call per event loop (thread-safe)."""
    by_loop: dict[Any, list[RequestState]] = {}
    for st in states:
        if st.loop is not None:
            by_loop.setdefault(st.loop, []).append(st)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            loop.call_soon_threadsafe(_set_events, group)


def _set_events(states: list[RequestState]) -> None:
    for st in states:
        st.event.set()
