"""SamplingParams: per-request generation options, with vLLM's names and validation that names the field."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from osserve.harmony.encoding import VOCAB_SIZE
from osserve.structured.grammar import StructuredOutput

# A logits processor sees the tokens generated so far and the row of logits for the next one, and returns
# the (possibly modified) row. It runs on the host side per request, so it costs a sync: use sparingly.
LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]  # noqa: F821


class ContextLengthError(ValueError):
    """The prompt plus the requested output does not fit max_seq_len (HTTP: context_length_exceeded)."""


class OutputKind(Enum):
    CUMULATIVE = "cumulative"  # each output holds everything generated so far
    DELTA = "delta"  # each output holds only what is new since the last one
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1: no top-k.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    # Number of top logprobs to return per generated / prompt token (0: only the chosen token's).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Whether outputs carry text. Clients that read only token ids (the chat and responses endpoints,
    # which parse Harmony from the ids) turn it off and skip detokenization; stop strings need it on.
    detokenize: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # A grammar the output must follow (osserve.structured builds it from a response format or a forced
    # tool call); plain data, so it crosses process boundaries with the rest.
    structured: StructuredOutput | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 or -1 disables it)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "a number in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "an integer or null")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or null")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= self.MAX_LOGPROBS):
                raise bad(name, f"an integer in [0, {self.MAX_LOGPROBS}] or null")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize (the text) on")
        if not isinstance(self.output_kind, OutputKind):
            raise bad("output_kind", f"one of {[k.value for k in OutputKind]}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise bad("structured", "a StructuredOutput (osserve.structured) or None")
        if self.structured is not None and self.min_tokens:
            # NOTE: min_tokens blocks the stop tokens a finished grammar allows alone: no token would be left.
            raise ValueError(
                "min_tokens cannot be combined with a structured output (response_format / tool_choice)"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check_request(
        self, prompt_len: int, vocab_size: int, max_seq_len: int, prompt_ids: list[int] | None = None
    ) -> int:
        """Validate against the model and request; return the effective max_tokens."""
        if prompt_len < 1:
            raise ValueError("prompt must contain at least one token")
        if prompt_ids is not None:
            _check_token_ids(prompt_ids, vocab_size)
        if self.structured is not None and vocab_size != VOCAB_SIZE:
            raise ValueError(
                f"structured outputs need gpt-oss's vocabulary ({VOCAB_SIZE} tokens); this model has {vocab_size}"
            )
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids contains {t}; token ids must be in [0, {vocab_size})")
        if prompt_len >= max_seq_len:
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens; max_seq_len is {max_seq_len}, leaving no room for output"
            )
        max_tokens = self.max_tokens if self.max_tokens is not None else max_seq_len - prompt_len
        if prompt_len + max_tokens > max_seq_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is {prompt_len + max_tokens}, "
                f"beyond max_seq_len ({max_seq_len})"
            )
        return max_tokens

    # -- the wire (engine process, remote workers) --------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """As plain data; logits processors (code) cannot cross processes."""
        if self.logits_processors:
            raise ValueError("logits processors (Python callables) cannot be sent to another process")
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "logits_processors"
        }
        out["output_kind"] = self.output_kind.value
        if self.structured is not None:
            out["structured"] = dataclasses.asdict(self.structured)
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(cls)} - {"logits_processors"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}")
        data = dict(data)
        data["output_kind"] = OutputKind(data.get("output_kind", OutputKind.DELTA.value))
        if isinstance(data.get("structured"), dict):
            data["structured"] = StructuredOutput(**data["structured"])
        return cls(**data)


def _check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise naming the first id that is not an integer in [0, vocab_size): one array pass in the common
    case (this runs for every request, in the engine loop too), Python only to name a culprit."""
    arr = np.asarray(ids)
    # NOTE: numpy folds True into an int array; bool is refused as before (the type scan runs in C).
    if (
        arr.dtype.kind in "iu"
        and len(arr)
        and arr.min() >= 0
        and arr.max() < vocab_size
        and bool not in set(map(type, ids))
    ):
        return
    for i, t in enumerate(ids):
        if not isinstance(t, int | np.integer) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(
                f"prompt_token_ids[{i}] is {t!r}; token ids must be integers in [0, {vocab_size})"
            )
