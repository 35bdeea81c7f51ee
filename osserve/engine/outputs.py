"""What the engine hands back: RequestOutput / CompletionOutput, with vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    # Text and tokens: everything so far (cumulative) or only what is new (delta), per the request's
    # output_kind.
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    # "stop", "length", "abort", "error" or None while running.
    finish_reason: str | None = None
    # The stop token id or stop string that ended it, if any.
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Set when the request failed inside the engine (finish_reason "error").
    error: str | None = None
    extra: dict = field(default_factory=dict)


def merge_completion(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    """One sample's delta `a` followed by its delta `b`, as one delta."""
    if a.logprobs is not None and b.logprobs is not None:
        logprobs: list | None = a.logprobs + b.logprobs
    else:
        logprobs = b.logprobs if b.logprobs is not None else a.logprobs
    return CompletionOutput(
        index=b.index,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        cumulative_logprob=b.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=b.finish_reason,
        stop_reason=b.stop_reason,
    )


def merge_delta(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta output that says what `a` then `b` (two consecutive delta outputs of one request) said.

    A consumer that fell behind the engine (a busy server streaming to hundreds of clients) takes the
    outputs waiting for it as one: one SSE event per step it could keep up with, not one per token."""
    by_index = {c.index: c for c in a.outputs}
    merged = []
    for c in b.outputs:
        p = by_index.pop(c.index, None)
        merged.append(c if p is None else merge_completion(p, c))
    merged.extend(by_index.values())  # a sample that had nothing new in `b` (kept only if `b` omits it)
    merged.sort(key=lambda c: c.index)
    metrics = b.metrics
    if a.metrics is not None and b.metrics is not None and a.metrics.first_token_time is not None:
        metrics = RequestMetrics(b.metrics.arrival_time, a.metrics.first_token_time, b.metrics.finished_time)
    return RequestOutput(
        request_id=b.request_id,
        prompt=b.prompt,
        prompt_token_ids=b.prompt_token_ids,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        outputs=merged,
        finished=b.finished,
        num_cached_tokens=b.num_cached_tokens,
        metrics=metrics or a.metrics,
        error=b.error or a.error,
        extra={**a.extra, **b.extra},
    )
