"""Moving a prompt's KV blocks from the prefill worker that holds them to the decode worker that continues.

The decode side pulls (as vLLM's NIXL connector does): it reserves blocks first, then asks the source for
the KV, writes it, and tells the source to release its copy. The prefill side never pushes, so a decode
worker that dies or a request that is cancelled mid-transfer leaves nothing behind there but a held
request, which `Release` (from the decode side or the frontend) or the hold timeout frees.

- `KVServer` (every worker): answers `Pull` with the KV and frees it on `Release` (ZeroMQ ROUTER).
- `ZmqKVTransport`: the KV bytes travel in the reply, as raw frames (no copies on the way). Works on CPU and
  across hosts.
- `CudaIpcKVTransport` (kv_cuda_ipc.py): same host, KV pools on GPUs: the source hands out CUDA IPC handles
  of its KV tensors once; a pull then returns only block ids and the decode worker copies device to device
  (over NVLink / PCIe peer access), with no host round trip.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket as pysocket
import time
import warnings
from abc import ABC, abstractmethod
from functools import cache
from typing import Any

import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from osserve.distributed.disagg.discovery import bind
from osserve.distributed.disagg.protocol import IpcHandles, KVReply, KVSource, Pull, Release, decode, encode
from osserve.engine.async_engine import AsyncEngine
from osserve.engine.engine import EngineCore
from osserve.engine.handoff import ExportedKV, KVHandoff

logger = logging.getLogger("osserve.disagg.kv")

PULL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3.0


class KVTransferError(RuntimeError):
    """The KV could not be fetched (source gone, request no longer held, layouts differ, timeout)."""


@cache
def host_id() -> str:
    """This machine's identity: processes with equal ids can share GPU memory through CUDA IPC."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{pysocket.gethostname()}:{boot}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KVTransferError(f"unknown KV dtype {name!r}")
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


# -- the source -------------------------------------------------------------------------------------------
class KVServer:
    """Serves this worker's held prompts (KVHandoff.held) to pulling decode workers."""

    def __init__(self, engine: AsyncEngine, handoff: KVHandoff, ctx: zmq.asyncio.Context, address: str):
        self.engine = engine
        self.handoff = handoff
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = bind(self.socket, address)
        self.transports = ["zmq"] + (
            ["cuda_ipc"] if engine.core is not None and engine.core.runner.device.type == "cuda" else []
        )
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
            elif isinstance(msg, IpcHandles):
                await self._ipc_handles(ident, msg)
        except Exception:  # noqa: BLE001 - a failed answer must not stop the server
            logger.exception("KV-plane request failed")

    async def _pull(self, ident: bytes, msg: Pull) -> None:
        ours = _layout_dict(self.handoff)
        if msg.layout != ours:
            reply = KVReply(
                msg.request_id, False, f"KV layouts differ: source {ours}, destination {msg.layout}"
            )
            await self.socket.send_multipart([ident, *encode(reply)])
            return
        host_copy = msg.transport != "cuda_ipc"

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

    async def _ipc_handles(self, ident: bytes, msg: IpcHandles) -> None:
        core = self.engine.core
        if msg.host_id != host_id() or core is None or core.runner.device.type != "cuda":
            await self.socket.send_multipart(
                [ident, *encode(KVReply("", False, "CUDA IPC needs one host and a GPU"))]
            )
            return
        from torch.multiprocessing.reductions import reduce_tensor

        dev = core.runner.device
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
        # (rebuild function, args) per layer for K and V; args[6] is the device index, which the receiver
        # maps to its own index of the same GPU (CUDA_VISIBLE_DEVICES may differ between the two).
        handles = [(reduce_tensor(k), reduce_tensor(v)) for k, v in core.runner.kv_caches]
        payload = pickle.dumps({"uuid": uuid, "handles": handles})
        await self.socket.send_multipart([ident, *encode(KVReply("", True), payload)])


def _layout_dict(handoff: KVHandoff) -> dict[str, Any]:
    lay = handoff.layout
    return {
        "block_size": lay.block_size,
        "num_kv_heads": lay.num_kv_heads,
        "head_dim": lay.head_dim,
        "dtype": lay.dtype,
        "layer_types": list(lay.layer_types),
        "sliding_window": lay.sliding_window,
    }


# -- the destination --------------------------------------------------------------------------------------
class _Peer:
    """One DEALER to one source's KV server; replies are matched to waiting pulls by request id. A source
    that drops its connection (it died) or cannot be reached fails its pulls at once, not at the timeout."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str):
        self.address = address
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        self.connected = False
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                for fut in self.waiting.values():
                    if not fut.done():
                        fut.set_exception(KVTransferError(f"KV source {self.address} disconnected"))

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

    async def ask(self, key: str, msg: Any, timeout: float) -> tuple[KVReply, list[Any]]:
        if key in self.waiting:
            raise KVTransferError(f"a pull of {key!r} from this source is already under way")
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        start = time.monotonic()
        try:
            await self.socket.send_multipart(encode(msg))
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    return fut.result()
                waited = time.monotonic() - start
                if not self.connected and waited > CONNECT_TIMEOUT_S:
                    raise KVTransferError(f"KV source {self.address} unreachable for {waited:.0f}s")
                if waited > timeout:
                    raise KVTransferError(f"no KV reply from {self.address} in {timeout:.0f}s")
        finally:
            self.waiting.pop(key, None)
            if not fut.done():
                fut.cancel()

    async def send(self, msg: Any) -> None:
        await self.socket.send_multipart(encode(msg))

    def close(self) -> None:
        self.reader.cancel()
        self.watcher.cancel()
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


class KVTransport(ABC):
    """Fetch a held prompt's KV from a source into this engine's reserved blocks."""

    name = ""

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
    async def fetch(self, source: KVSource, request_id: str) -> None:
        """Write the KV the source holds (as `source.request_id`) into the blocks reserved here for
        `request_id` (raises KVTransferError)."""

    async def release(self, source: KVSource) -> None:
        """Tell the source to free its copy (fire and forget)."""
        try:
            await self.peer(source.kv_address).send(Release(source.request_id))
        except zmq.ZMQError as e:
            logger.warning("could not release %s at %s: %s", source.request_id, source.worker_id, e)

    async def _pull(self, source: KVSource) -> tuple[KVReply, list[Any]]:
        msg = Pull(source.request_id, self.name, _layout_dict(self.handoff))
        reply, frames = await self.peer(source.kv_address).ask(source.request_id, msg, self.timeout_s)
        if not reply.ok:
            raise KVTransferError(f"{source.worker_id}: {reply.error}")
        return reply, frames

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


class ZmqKVTransport(KVTransport):
    """KV bytes in ZeroMQ frames: device -> host on the source, host -> device here."""

    name = "zmq"

    async def fetch(self, source: KVSource, request_id: str) -> None:
        reply, frames = await self._pull(source)
        if len(frames) != 2:
            raise KVTransferError(f"KV reply with {len(frames)} data frames, expected 2")
        dtype = _dtype(reply.dtype)
        full = _tensor(frames[0], dtype, reply.full_shape)
        sliding = _tensor(frames[1], dtype, reply.sliding_shape)
        try:
            await self.engine.call(lambda core: self.handoff.write(request_id, full, sliding), self.timeout_s)
        except (ValueError, KeyError) as e:
            raise KVTransferError(f"could not write the KV of {request_id}: {e}") from None


def make_transports(
    kind: str,
    engine: AsyncEngine,
    handoff: KVHandoff,
    ctx: zmq.asyncio.Context,
    timeout_s: float = PULL_TIMEOUT_S,
) -> list[KVTransport]:
    """Transports to try, best first: `kind` is auto | zmq | cuda_ipc.

    auto is ZeroMQ: the CUDA IPC transport did not complete its test on the H100 (docs/PERFORMANCE.md, run
    9: the test ran past 120 s without a result), so it is used only when asked for by name."""
    if kind not in ("auto", "zmq", "cuda_ipc"):
        raise ValueError(f"kv_transport is {kind!r}; allowed: 'auto', 'zmq', 'cuda_ipc'")
    out: list[KVTransport] = []
    if kind == "cuda_ipc" and torch.cuda.is_available():
        from osserve.distributed.disagg.kv_cuda_ipc import CudaIpcKVTransport

        out.append(CudaIpcKVTransport(engine, handoff, ctx, timeout_s))
    out.append(ZmqKVTransport(engine, handoff, ctx, timeout_s))
    return out
