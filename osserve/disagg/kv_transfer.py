"""Moving a prompt's KV blocks from the prefill worker that holds them to the decode worker that continues.

The decode side pulls (as vLLM's NIXL connector does): it reserves blocks first, then fetches the KV into
them, and tells the source to release its copy. The prefill side never pushes, so a decode worker that dies
or a request that is cancelled mid-transfer leaves nothing behind there but a held request, which `Release`
(from the decode side or the frontend) or the hold timeout frees.

- `KVServer` (every worker): answers `Pull` (with the KV bytes, or with only the block ids for a transport
  that reads them itself) and frees the KV on `Release` (ZeroMQ ROUTER).
- `ZmqKVTransport`: the KV bytes travel in the reply, as raw frames (device -> host -> ZeroMQ -> host ->
  device). Works on CPU and across hosts.
- `NixlKVTransport` (kv_nixl.py): the decode worker READs the blocks straight out of the source's registered
  KV pool with NIXL (GPU to GPU over CUDA IPC / NVLink on one host, RDMA across hosts).
A fetch that fails or passes its deadline raises KVTransferError with a `reason`; the worker then recomputes
the prompt and counts the reason (TransferStats, shown in the frontend's /metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from osserve.disagg.discovery import bind
from osserve.disagg.messages import KVReply, KVSource, Pull, Release, decode, encode
from osserve.engine.async_engine import AsyncEngine
from osserve.engine.engine import EngineCore
from osserve.engine.handoff import ExportedKV, KVHandoff, ReservedBlocks

logger = logging.getLogger("osserve.disagg.kv")

PULL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3.0
# Why a fetch failed (the label of the fallback counter): no answer or no completion before the deadline;
# the source died or cannot be reached; it no longer holds the KV; the two engines' KV layouts differ; no
# transport both sides serve; anything else.
FALLBACK_REASONS = ("timeout", "source_lost", "not_held", "mismatch", "unsupported", "error")


class KVTransferError(RuntimeError):
    """The KV could not be fetched; `reason` is one of FALLBACK_REASONS."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        assert reason in FALLBACK_REASONS, reason
        self.reason = reason


@dataclass
class FetchResult:
    num_bytes: int
    # Seconds the bytes took to move (NIXL: READ posted -> complete; zmq: the whole pull and write).
    move_seconds: float


@dataclass
class TransferStats:
    """A decode worker's KV fetches by transport, and its fallbacks to recomputing by reason."""

    fetches: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    # Reserved blocks -> KV in place (asking the source, moving, writing).
    seconds: dict[str, float] = field(default_factory=dict)
    move_seconds: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))

    def add(self, transport: str, result: FetchResult, seconds: float) -> None:
        for d, v in (
            (self.fetches, 1),
            (self.bytes, result.num_bytes),
            (self.seconds, seconds),
            (self.move_seconds, result.move_seconds),
        ):
            d[transport] = d.get(transport, 0) + v

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in vars(self).items()}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KVTransferError(f"unknown KV dtype {name!r}", "mismatch")
    return dtype


def _frame(t: torch.Tensor | None) -> Any:
    return b"" if t is None else t.contiguous().view(torch.uint8).numpy()


def _tensor(frame: Any, dtype: torch.dtype, shape: list[int] | None) -> torch.Tensor | None:
    if shape is None:
        return None
    with warnings.catch_warnings():
        # The frame is read-only; it is only read (copied into the KV pool).
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(frame.buffer if isinstance(frame, zmq.Frame) else frame, dtype=torch.uint8)
    return flat.view(dtype).view(*shape)


def layout_dict(handoff: KVHandoff) -> dict[str, Any]:
    lay = handoff.layout
    return {
        "block_size": lay.block_size,
        "num_kv_heads": lay.num_kv_heads,
        "head_dim": lay.head_dim,
        "dtype": lay.dtype,
        "layer_types": list(lay.layer_types),
        "sliding_window": lay.sliding_window,
    }


# -- the source -------------------------------------------------------------------------------------------
class KVServer:
    """Serves this worker's held prompts (KVHandoff.held) to pulling decode workers."""

    def __init__(
        self,
        engine: AsyncEngine,
        handoff: KVHandoff,
        ctx: zmq.asyncio.Context,
        address: str,
        transports: list[str],
    ):
        self.engine = engine
        self.handoff = handoff
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = bind(self.socket, address)
        # What pullers may ask for: "zmq" always, "nixl" when this worker's KV pool is registered.
        self.transports = transports
        self.num_pulls = 0
        self.num_released = 0
        self._task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._handlers) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.socket.close(0)

    async def _serve(self) -> None:
        while True:
            ident, *parts = await self.socket.recv_multipart(copy=True)
            try:
                msg, _ = decode(parts)
            except ValueError as e:
                logger.warning("bad KV-plane message: %s", e)
                continue
            # Each request is answered on its own task, so one slow export does not hold up the others.
            task = asyncio.ensure_future(self._handle(ident, msg))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, ident: bytes, msg: Any) -> None:
        try:
            if isinstance(msg, Pull):
                await self._pull(ident, msg)
            elif isinstance(msg, Release):
                if await self.engine.call(
                    lambda core: self.handoff.release(msg.request_id), timeout=PULL_TIMEOUT_S
                ):
                    self.num_released += 1
                logger.debug("release %s", msg.request_id)
        except Exception:  # noqa: BLE001 - a failed answer must not stop the server
            logger.exception("KV-plane request failed")

    async def _pull(self, ident: bytes, msg: Pull) -> None:
        ours = layout_dict(self.handoff)
        error = ""
        if msg.layout != ours:
            error = f"KV layouts differ: source {ours}, destination {msg.layout}"
        elif msg.transport not in self.transports:
            error = f"transport {msg.transport!r} not served here (serving {', '.join(self.transports)})"
        if error:
            await self.socket.send_multipart([ident, *encode(KVReply(msg.request_id, False, error))])
            return
        host_copy = msg.transport == "zmq"

        def export(core: EngineCore) -> ExportedKV | None:
            if msg.request_id not in self.handoff.held:
                return None
            kv = self.handoff.export(msg.request_id, gather=host_copy)
            if host_copy:  # on the engine thread: a device -> host copy synchronizes with its stream
                kv.full = kv.full.cpu() if kv.full is not None else None
                kv.sliding = kv.sliding.cpu() if kv.sliding is not None else None
            return kv

        kv = await self.engine.call(export, timeout=PULL_TIMEOUT_S)
        if kv is None:
            reply = KVReply(msg.request_id, False, "not held here (released, expired or never prefilled)")
            await self.socket.send_multipart([ident, *encode(reply)])
            return
        self.num_pulls += 1
        reply = KVReply(
            msg.request_id,
            True,
            num_tokens=kv.num_tokens,
            dtype=self.handoff.layout.dtype,
            full_shape=list(kv.full.shape) if kv.full is not None else None,
            sliding_shape=list(kv.sliding.shape) if kv.sliding is not None else None,
            full_block_ids=kv.full_block_ids,
            sliding_block_ids=kv.sliding_block_ids,
        )
        frames = [_frame(kv.full), _frame(kv.sliding)] if host_copy else []
        await self.socket.send_multipart([ident, *encode(reply, *frames)], copy=False)


# -- the destination --------------------------------------------------------------------------------------
class _Peer:
    """One DEALER to one source's KV server; replies are matched to waiting pulls by request id. A source
    that drops its connection (it died) fails its pulls at once, also those asked after the drop; one that
    was never reached fails them after CONNECT_TIMEOUT_S."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str):
        self.address = address
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        self.connected = False
        # Disconnects seen so far: a transfer that saw this change lost its source.
        self.num_disconnects = 0
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())
        self.watcher = asyncio.ensure_future(self._watch())

    @property
    def lost(self) -> bool:
        return self.num_disconnects > 0 and not self.connected

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.num_disconnects += 1
                for fut in self.waiting.values():
                    if not fut.done():
                        fut.set_exception(
                            KVTransferError(f"KV source {self.address} disconnected", "source_lost")
                        )

    async def _read(self) -> None:
        while True:
            parts = await self.socket.recv_multipart(copy=False)
            try:
                reply, frames = decode([p.bytes if i < 2 else p for i, p in enumerate(parts)])
            except ValueError as e:
                logger.warning("bad KV reply: %s", e)
                continue
            fut = self.waiting.pop(reply.request_id, None)
            if fut is not None and not fut.done():  # else: the pull was cancelled or timed out
                fut.set_result((reply, frames))

    async def ask(self, key: str, msg: Any, deadline: float) -> tuple[KVReply, list[Any]]:
        """Send `msg` and wait for the reply to `key` until `deadline` (time.monotonic())."""
        if self.lost:
            raise KVTransferError(f"KV source {self.address} disconnected", "source_lost")
        if key in self.waiting:
            raise KVTransferError(f"a pull of {key!r} from this source is already under way")
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        start = time.monotonic()
        try:
            await self.socket.send_multipart(encode(msg))
            while True:
                done, _ = await asyncio.wait({fut}, timeout=max(0.0, min(0.25, deadline - time.monotonic())))
                if done:
                    return fut.result()
                waited = time.monotonic() - start
                if not self.connected and waited > CONNECT_TIMEOUT_S:
                    raise KVTransferError(
                        f"KV source {self.address} unreachable for {waited:.0f}s", "source_lost"
                    )
                if time.monotonic() >= deadline:
                    raise KVTransferError(f"no KV reply from {self.address} in {waited:.1f}s", "timeout")
        finally:
            self.waiting.pop(key, None)
            if not fut.done():
                fut.cancel()

    def send(self, msg: Any) -> None:
        """Fire and forget (queued while the source reconnects; dropped when the queue is full)."""
        self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.reader.cancel()
        self.watcher.cancel()
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


class KVTransport(ABC):
    """Fetch a held prompt's KV from a source into this engine's reserved blocks."""

    name = ""
    # True when the transport writes the reserved blocks off the engine thread: they are reserved pinned
    # (KVHandoff.reserve) and the transport ends the pin (KVHandoff.end_import) once nothing writes them.
    pins_blocks = False

    def __init__(
        self,
        engine: AsyncEngine,
        handoff: KVHandoff,
        ctx: zmq.asyncio.Context,
        timeout_s: float = PULL_TIMEOUT_S,
    ):
        self.engine = engine
        self.handoff = handoff
        self.ctx = ctx
        self.timeout_s = timeout_s
        self._peers: dict[str, _Peer] = {}

    def peer(self, address: str) -> _Peer:
        if address not in self._peers:
            self._peers[address] = _Peer(self.ctx, address)
        return self._peers[address]

    def can_fetch(self, source: KVSource) -> bool:
        return self.name in source.transports

    @abstractmethod
    async def fetch(self, source: KVSource, request_id: str, reserved: ReservedBlocks) -> FetchResult:
        """Write the KV the source holds (as `source.request_id`) into the blocks reserved here for
        `request_id` within `timeout_s` (raises KVTransferError)."""

    def release(self, source: KVSource) -> None:
        """Tell the source to free its copy (fire and forget)."""
        try:
            self.peer(source.kv_address).send(Release(source.request_id))
        except zmq.ZMQError as e:
            logger.warning("could not release %s at %s: %s", source.request_id, source.worker_id, e)

    async def _pull(self, source: KVSource, deadline: float) -> tuple[KVReply, list[Any]]:
        msg = Pull(source.request_id, self.name, layout_dict(self.handoff))
        reply, frames = await self.peer(source.kv_address).ask(source.request_id, msg, deadline)
        if not reply.ok:
            reason = "not_held" if reply.error.startswith("not held") else "mismatch"
            raise KVTransferError(f"{source.worker_id}: {reply.error}", reason)
        return reply, frames

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


class ZmqKVTransport(KVTransport):
    """KV bytes in ZeroMQ frames: device -> host on the source, host -> device here."""

    name = "zmq"

    async def fetch(self, source: KVSource, request_id: str, reserved: ReservedBlocks) -> FetchResult:
        start = time.monotonic()
        reply, frames = await self._pull(source, start + self.timeout_s)
        if len(frames) != 2:
            raise KVTransferError(f"KV reply with {len(frames)} data frames, expected 2", "mismatch")
        dtype = _dtype(reply.dtype)
        full = _tensor(frames[0], dtype, reply.full_shape)
        sliding = _tensor(frames[1], dtype, reply.sliding_shape)
        left = start + self.timeout_s - time.monotonic()
        try:
            await self.engine.call(lambda core: self.handoff.write(request_id, full, sliding), max(left, 0.1))
        except (ValueError, KeyError) as e:
            raise KVTransferError(f"could not write the KV of {request_id}: {e}", "mismatch") from None
        except TimeoutError:
            raise KVTransferError(f"writing the KV of {request_id} passed the deadline", "timeout") from None
        num_bytes = sum(t.numel() * t.element_size() for t in (full, sliding) if t is not None)
        return FetchResult(num_bytes, time.monotonic() - start)
