"""Request: a prompt, its output so far, and how much of it has been computed (the counters design)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from osserve.sampling_params import SamplingParams
from osserve.structured import GrammarMatcher


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Finished states, all >= FINISHED_STOPPED.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


# NOTE: eq=False: requests are compared by identity (list membership / removal stay O(1) per compare).
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Effective max_tokens after checking against max_seq_len.
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # Requests of one `n > 1` family share a parent id; siblings wait for the first one's prompt to be
    # computed so that they reuse its KV blocks instead of computing the prompt again.
    parent_id: str | None = None
    sample_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled on the device but not yet read back (overlap scheduling): 0 or 1.
    num_pending: int = 0
    # Disaggregated prefill: stop scheduling after the first token (its KV is shipped, not extended).
    hold_after_first_token: bool = False
    # Chained hashes of the request's full blocks so far (prefix caching); tokens never change once
    # known, so the list only grows. Filled by KVCacheManager.
    block_hashes: list[int] = field(default_factory=list)
    # Prompt tokens that came from the prefix cache at admission (for usage / metrics).
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    # Per-token logprob entries {token_id: (logprob, rank)} for the sampled token and the top ones.
    logprobs: list[dict[int, tuple[float, int]]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] = field(default_factory=list)
    # Prompt positions whose logprob entries a launched step already computes (set at launch time, so
    # overlapping steps never produce an entry twice).
    num_prompt_logprobs_launched: int = 0
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    # Where the output stands in its grammar (SamplingParams.structured); advanced by each sampled token.
    grammar: GrammarMatcher | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None
