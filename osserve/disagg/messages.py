"""Wire messages of the disaggregated deployment, encoded with msgspec (MessagePack) over ZeroMQ.

A ZeroMQ message is multipart: `[kind, body, *raw frames]`. `kind` names the struct of `body`; raw frames
carry KV bytes without copies. Control plane (frontend DEALER -> worker ROUTER): Generate, Abort, StatsQuery
one way; Output, Failed, Stats back. KV plane (decode DEALER -> prefill ROUTER): Pull -> KVReply (+ frames),
Release. Registry (worker DEALER -> frontend ROUTER, when there is no etcd): RegistryCall -> RegistryReply.
"""

from __future__ import annotations

from typing import Any

import msgspec

from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import SamplingParams

ROLES = ("prefill", "decode", "both")
# How a decode worker pulls KV (docs/DEPLOY.md, "KV transfer"): auto = nixl when both sides registered their
# KV pool with NIXL, else zmq.
KV_TRANSPORTS = ("auto", "zmq", "nixl")


def check_kv_transport(name: str) -> str:
    """`name` if it is a KV transport (raises ValueError naming the valid ones otherwise)."""
    if name not in KV_TRANSPORTS:
        hint = " (cuda_ipc was removed: nixl moves KV GPU to GPU on one host)" if name == "cuda_ipc" else ""
        raise ValueError(f"kv_transport is {name!r}{hint}; allowed: {', '.join(KV_TRANSPORTS)}")
    return name


# -- control plane ----------------------------------------------------------------------------------------
class KVSource(msgspec.Struct):
    """Where a held prompt's KV can be pulled from."""

    worker_id: str
    kv_address: str
    # The request's id on the source (a retried request gets a new id per attempt).
    request_id: str
    # KV transports the source serves ("zmq" always; "nixl" when its KV pool is registered with NIXL, whose
    # agent metadata is in the source's registry record).
    transports: list[str] = msgspec.field(default_factory=lambda: ["zmq"])


class Handoff(msgspec.Struct):
    """osserve.engine.handoff.HandoffState on the wire."""

    output_token_ids: list[int]
    num_sent_chars: int = 0
    cumulative_logprob: float = 0.0
    rng_state: bytes | None = None


class Generate(msgspec.Struct):
    """Start a request on a worker.

    mode "generate": the whole request here (aggregated). "prefill": stop after the first token and hold
    the KV for a decode worker. "continue": carry on from `handoff` (tokens already produced elsewhere),
    pulling the prompt's KV from `kv_source` when given, else recomputing it."""

    request_id: str
    mode: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    handoff: Handoff | None = None
    kv_source: KVSource | None = None


class Abort(msgspec.Struct):
    request_id: str


class StatsQuery(msgspec.Struct):
    # Version of this worker's block-hash set the asker holds (-1: none); the reply carries a diff from it.
    hashes_version: int = -1


class Output(msgspec.Struct):
    request_id: str
    output: RequestOutput
    # Set on a prefill worker's last output: the decode side continues from here.
    handoff: Handoff | None = None
    kv_source: KVSource | None = None


class Failed(msgspec.Struct):
    request_id: str
    message: str
    # True when another worker may succeed (e.g. no room here); False for a request that can never run.
    retryable: bool = False


class Stats(msgspec.Struct):
    worker_id: str
    state: str
    stats: dict[str, Any]
    hashes_version: int
    # The full set when `hashes_full`, else what changed since the version the asker held.
    hashes_added: list[int]
    hashes_removed: list[int]
    hashes_full: bool


# -- KV plane ---------------------------------------------------------------------------------------------
class Pull(msgspec.Struct):
    request_id: str
    # "zmq": the KV bytes come back in the reply; "nixl": only the block ids (the puller READs them).
    transport: str
    layout: dict[str, Any]


class KVReply(msgspec.Struct):
    request_id: str
    ok: bool
    error: str = ""
    num_tokens: int = 0
    dtype: str = ""
    full_shape: list[int] | None = None
    sliding_shape: list[int] | None = None
    full_block_ids: list[int] = []
    sliding_block_ids: list[int] = []


class Release(msgspec.Struct):
    request_id: str


# -- registry (frontend-held, when the deployment names no etcd) --------------------------------------------
class RegistryCall(msgspec.Struct):
    call_id: int
    op: str  # grant | keepalive | put | list | revoke
    ttl: float = 0.0
    lease: int = 0
    key: str = ""
    value: dict[str, Any] | None = None


class RegistryReply(msgspec.Struct):
    call_id: int
    ok: bool = True
    error: str = ""
    lease: int = 0
    alive: bool = True
    items: dict[str, dict[str, Any]] = {}


_STRUCTS = {
    cls.__name__.lower().encode(): cls
    for cls in (
        Generate,
        Abort,
        StatsQuery,
        Output,
        Failed,
        Stats,
        Pull,
        KVReply,
        Release,
        RegistryCall,
        RegistryReply,
    )
}
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _STRUCTS.items()}


def encode(msg: msgspec.Struct, *frames: Any) -> list[Any]:
    """The multipart message for `msg` (plus raw frames)."""
    return [type(msg).__name__.lower().encode(), _ENCODER.encode(msg), *frames]


def decode(parts: list[Any]) -> tuple[Any, list[Any]]:
    """(message, raw frames) of a multipart message; raises ValueError on an unknown kind or bad body."""
    if len(parts) < 2:
        raise ValueError(f"malformed message with {len(parts)} part(s)")
    kind = bytes(parts[0])
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"unknown message kind {kind!r}")
    try:
        return decoder.decode(parts[1]), parts[2:]
    except msgspec.DecodeError as e:
        raise ValueError(f"bad {kind.decode()} message: {e}") from None


# -- SamplingParams ---------------------------------------------------------------------------------------
def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as plain data; logits processors (code) cannot cross processes."""
    return params.to_wire()


def params_from_wire(data: dict[str, Any]) -> SamplingParams:
    return SamplingParams.from_wire(data)
