"""Request: a prompt, its output so far, and how much of it has been computed (the counters design).

While a request runs it holds a row of the persistent batch (osserve/engine/input_batch.py), and its hot
counters (tokens computed, tokens pending) live in that row's arrays, where a whole step updates them at
once; the properties below read and write whichever place holds them.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

import torch

from osserve.sampling_params import SamplingParams
from osserve.structured import GrammarMatcher

if TYPE_CHECKING:
    from osserve.engine.input_batch import InputBatch


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


class _RowCounter:
    """A counter that lives in the persistent batch's column `column` while the request holds a row, and in
    the request's own slot `private` otherwise."""

    def __init__(self, column: str, private: str):
        self.column, self.private = column, private

    def __get__(self, req: Request | None, owner: type) -> Any:
        if req is None:
            return self
        if req.row >= 0:
            return int(getattr(req._batch, self.column)[req.row])
        return getattr(req, self.private)

    def __set__(self, req: Request, value: int) -> None:
        if req.row >= 0:
            getattr(req._batch, self.column)[req.row] = value
        else:
            setattr(req, self.private, value)


class Request:
    """One sample of a user request (a request with n > 1 is n of these sharing `parent_id`). Compared by
    identity, so list membership and removal stay cheap."""

    __slots__ = (
        "handle",
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "max_tokens",
        "eos_token_ids",
        "arrival_time",
        "parent_id",
        "sample_index",
        "output_token_ids",
        "hold_after_first_token",
        "block_hashes",
        "num_cached_tokens",
        "status",
        "num_preemptions",
        "num_prompt_logprobs_launched",
        "generator",
        "grammar",
        "row",
        "_batch",
        "_num_computed",
        "_num_pending",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        parent_id: str | None = None,
        sample_index: int = 0,
        handle: int = -1,
        grammar: GrammarMatcher | None = None,
    ):
        # The client's integer name for this sample: outputs travel keyed by it (EngineCoreOutputs).
        self.handle = handle
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        # Effective max_tokens after checking against max_seq_len.
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic()
        # Samples of one `n > 1` request share a parent id; siblings wait for the first one's prompt to be
        # computed so that they reuse its KV blocks instead of computing the prompt again.
        self.parent_id = parent_id
        self.sample_index = sample_index
        self.output_token_ids: list[int] = []
        # Disaggregated prefill: stop scheduling after the first token (its KV is shipped, not extended).
        self.hold_after_first_token = False
        # Chained hashes of the request's full blocks so far (prefix caching); tokens never change once
        # known, so the list only grows. Filled by KVCacheManager.
        self.block_hashes: list[int] = []
        # Prompt tokens that came from the prefix cache at admission (for usage / metrics).
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        # Prompt positions whose logprob entries a launched step already computes (set at launch time, so
        # overlapping steps never produce an entry twice).
        self.num_prompt_logprobs_launched = 0
        self.generator: torch.Generator | None = None
        # Where the output stands in its grammar (SamplingParams.structured); advanced by each sampled token.
        self.grammar = grammar
        # Row in the persistent batch while running (-1 otherwise).
        self.row = -1
        self._batch: InputBatch | None = None
        self._num_computed = 0
        # Tokens sampled on the device but not yet read back (overlap scheduling): 0 or 1.
        self._num_pending = 0

    # -- counters (in the batch row while running) ------------------------------------------------------
    num_computed_tokens = _RowCounter("num_computed", "_num_computed")
    num_pending = _RowCounter("num_pending", "_num_pending")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

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

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, handle={self.handle}, row={self.row}, status={self.status.name})"
        )
