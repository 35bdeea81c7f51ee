"""What the engine hands back.

Two levels. `EngineCoreOutputs` is what EngineCore.step() returns: token ids only, one packed message per
step for the whole batch (numpy arrays; `encode_outputs` / `decode_outputs` put it on the wire between the
engine process and the server). `RequestOutput` / `CompletionOutput` (vLLM's field names) are what users of
the engine see: text, logprobs and finish reasons per request, built on the client side by
osserve/engine/output_processor.py.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np


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


# -------------------------------------------------------------------------------------------------------
# The engine core's side: packed per-step outputs, token ids only.


class Finish(enum.IntEnum):
    """Why a sample stopped, as carried in EngineCoreOutputs.finish (0: it did not)."""

    NONE = 0
    EOS = 1  # an end-of-sequence token (finish_reason "stop", stop_reason None)
    STOP_TOKEN = 2  # one of the request's stop_token_ids (finish_reason "stop", stop_reason the token)
    LENGTH = 3  # max_tokens or max_seq_len
    ABORT = 4
    ERROR = 5
    # Disaggregated prefill: the request left this engine after its first token; its KV waits for a
    # decode worker (EngineCoreOutputs.handoff holds the state to continue from).
    HANDOFF = 6


FINISH_REASONS = {
    Finish.EOS: "stop",
    Finish.STOP_TOKEN: "stop",
    Finish.LENGTH: "length",
    Finish.ABORT: "abort",
    Finish.ERROR: "error",
}


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Prompt logprob entries of prompt positions start .. start + len(ranks) - 1 of one sample."""

    handle: int
    start: int
    ids: Any  # [n, 1 + k] int32: the prompt token, then the top k
    logprobs: Any  # [n, 1 + k] float32
    ranks: Any  # [n] int32: rank of the prompt token


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step's results for the whole batch. Entry i concerns the sample with handle `handles[i]`: the
    token it sampled (`tokens[i]`, -1 when it sampled none) and whether that ended it (`finish[i]`)."""

    handles: Any = None  # [n] int64
    tokens: Any = None  # [n] int32
    finish: Any = None  # [n] int8, Finish values
    # Sampled-token logprobs, only for entries whose request asked: entry index, then [m, 1 + k] ids and
    # logprobs (the sampled token first, then the top k of the widest request), [m] rank of the sampled token.
    lp_index: Any = None
    lp_ids: Any = None
    lp_values: Any = None
    lp_ranks: Any = None
    prompt_logprobs: list[PromptLogprobs] = []
    # (handle, prompt tokens served from the prefix cache), once per sample when it is first scheduled.
    num_cached: list[tuple[int, int]] = []
    # (first handle of the request, message): requests refused when the engine took them.
    errors: list[tuple[int, str]] = []
    # handle -> what a decode worker needs to continue the sample (Finish.HANDOFF); see engine/handoff.py.
    handoff: dict[int, Any] = {}
    stats: dict[str, Any] | None = None

    @classmethod
    def empty(cls) -> EngineCoreOutputs:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int8))

    def __len__(self) -> int:
        return 0 if self.handles is None else len(self.handles)


def concat_outputs(parts: list[EngineCoreOutputs]) -> EngineCoreOutputs:
    """Several steps' (or ranks') outputs as one, in order."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    out = EngineCoreOutputs.empty()
    if not parts:
        return out
    full = [p for p in parts if len(p)]
    if full:
        out.handles = np.concatenate([p.handles for p in full])
        out.tokens = np.concatenate([p.tokens for p in full])
        out.finish = np.concatenate([p.finish for p in full])
        with_lp = [(p, off) for p, off in zip(full, np.cumsum([0] + [len(p) for p in full]), strict=False)]
        lps = [(p, int(off)) for p, off in with_lp if p.lp_index is not None and len(p.lp_index)]
        if lps:
            width = max(p.lp_ids.shape[1] for p, _ in lps)
            out.lp_index = np.concatenate([p.lp_index + off for p, off in lps]).astype(np.int32)
            out.lp_ids = np.concatenate([_widen(p.lp_ids, width, -1) for p, _ in lps])
            out.lp_values = np.concatenate([_widen(p.lp_values, width, -np.inf) for p, _ in lps])
            out.lp_ranks = np.concatenate([p.lp_ranks for p, _ in lps])
    for p in parts:
        out.prompt_logprobs = (
            out.prompt_logprobs + p.prompt_logprobs if p.prompt_logprobs else out.prompt_logprobs
        )
        out.num_cached = out.num_cached + p.num_cached if p.num_cached else out.num_cached
        out.errors = out.errors + p.errors if p.errors else out.errors
        if p.handoff:
            out.handoff = {**out.handoff, **p.handoff}
    out.stats = parts[-1].stats
    return out


def _widen(a: np.ndarray, width: int, fill: float) -> np.ndarray:
    if a.shape[1] == width:
        return a
    out = np.full((a.shape[0], width), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


# -- the wire (engine process -> server): MessagePack, numpy arrays as extension values -------------------
_NDARRAY = 1


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        dtype = a.dtype.str.encode()
        head = struct.pack(f"<B{len(dtype)}sB{a.ndim}q", len(dtype), dtype, a.ndim, *a.shape)
        return msgspec.msgpack.Ext(_NDARRAY, head + a.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _NDARRAY:
        raise ValueError(f"unknown extension type {code}")
    n = data[0]
    dtype = np.dtype(bytes(data[1 : 1 + n]).decode())
    ndim = data[1 + n]
    off = 2 + n
    shape = struct.unpack_from(f"<{ndim}q", data, off)
    off += 8 * ndim
    # NOTE: copied out of the message buffer (which msgspec does not keep alive), and writable.
    return np.frombuffer(bytearray(data[off:]), dtype=dtype).reshape(shape)


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_DECODER = msgspec.msgpack.Decoder(EngineCoreOutputs, ext_hook=_ext_hook)


def encode_outputs(outs: EngineCoreOutputs) -> bytes:
    return _ENCODER.encode(outs)


def decode_outputs(data: bytes | memoryview) -> EngineCoreOutputs:
    return _DECODER.decode(data)
