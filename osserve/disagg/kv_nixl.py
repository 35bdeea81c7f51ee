"""The NIXL KV transport: the decode worker READs a prompt's blocks straight out of the prefill worker's KV pool.

NIXL (NVIDIA's transfer library, UCX inside; what Dynamo, vLLM's NixlConnector and SGLang use) moves
registered memory GPU to GPU over CUDA IPC / NVLink on one host and over RDMA across hosts, and host to host
through shared memory or TCP, behind one API. Here:

- `NixlPool` (every worker whose kv_transport allows it): one NIXL agent per worker process with the
  engine's K and V tensors registered once. Its `record()` (agent metadata, where each tensor starts, the
  bytes of one block) goes into the worker's registry record, so decode workers find it through the
  discovery the deployment already has (etcd or the frontend's registry).
- `NixlKVTransport` (decode side): asks the source for the request's block ids (a `Pull` without data),
  then posts one READ whose descriptors cover, for every K/V tensor of a layer slot, each run of blocks that
  is contiguous on both sides: full-attention blocks into the full-attention slots, the sliding-window
  blocks still in the window into the sliding ones. Nothing goes through host memory when both pools are
  on GPUs.

The KV tensors are [num_blocks, block_size, kv_heads, head_dim] per layer slot (engine/runner.py), so block
b of a tensor is one contiguous range of `block_bytes` at `address + b * block_bytes`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq.asyncio

from osserve.disagg.kv_transfer import FetchResult, KVTransferError, KVTransport
from osserve.disagg.messages import KVSource
from osserve.engine.async_engine import AsyncEngine, EngineDeadError
from osserve.engine.engine import EngineCore
from osserve.engine.handoff import KVHandoff, ReservedBlocks

logger = logging.getLogger("osserve.disagg.kv")

# The module names NIXL's wheels install (nixl-cu13, nixl-cu12, and the `nixl` meta package).
NIXL_MODULES = ("nixl_cu13", "nixl_cu12", "nixl._api")
# Polling a posted READ: a few plain yields to the event loop first (a READ between GPUs of one host often
# takes tens of microseconds, and the figure in /metrics should not be the poll interval), then sleeps
# doubling from POLL_MIN_S to POLL_MAX_S.
POLL_YIELDS = 8
POLL_MIN_S, POLL_MAX_S = 0.0001, 0.005
UCX_GET_ZCOPY = "UCX_CUDA_IPC_ENABLE_GET_ZCOPY"


def import_nixl() -> Any | None:
    """The installed NIXL module (with nixl_agent, nixl_agent_config), or None."""
    for name in NIXL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if os.environ.get("NIXL_LOG_LEVEL") is None:
            # NIXL logs every agent and backend it creates at INFO on stdout.
            logging.getLogger("nixl").setLevel(logging.WARNING)
        # UCX serves a READ of another process's device memory with cuda_ipc only where its GET is enabled,
        # and by default ("auto") it is enabled only where NVML reports NVLinks: between two workers on one GPU
        # (or GPUs on PCIe) UCX then emulates the READ through host memory over TCP (0.1-0.6 GiB/s on an H200,
        # docs/PERFORMANCE.md run 26) where the cuda_ipc copy stays on the device. Set before any agent reads
        # UCX's configuration; a value the user set wins.
        os.environ.setdefault(UCX_GET_ZCOPY, "y")
        return module
    return None


def kv_tensors(core: EngineCore) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """The engine's distinct K/V tensors (full and sliding layer j share slot j's), and the indices of those
    the full-attention and the sliding-window layers use."""
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}
    per_layer = []
    for k, v in core.runner.kv_caches:
        ids = []
        for t in (k, v):
            if t.data_ptr() not in index:
                index[t.data_ptr()] = len(tensors)
                tensors.append(t)
            ids.append(index[t.data_ptr()])
        per_layer.append(ids)
    mcfg = core.runner.model_config
    full = sorted({i for layer in mcfg.full_layers for i in per_layer[layer]})
    sliding = sorted({i for layer in mcfg.sliding_layers for i in per_layer[layer]})
    return tensors, full, sliding


@dataclass(frozen=True)
class PoolInfo:
    """A registered KV pool as another worker sees it (from its registry record)."""

    agent: str
    mem_type: str  # "VRAM" | "DRAM"
    device_id: int
    addresses: list[int]
    block_bytes: int
    num_blocks: int

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PoolInfo:
        return cls(
            rec["agent"],
            rec["mem_type"],
            int(rec["device_id"]),
            [int(a) for a in rec["addresses"]],
            int(rec["block_bytes"]),
            int(rec["num_blocks"]),
        )


class NixlPool:
    """A NIXL agent (UCX backend) with KV tensors registered once: `tensors` are [num_blocks, ...] of one
    shape; `full_tensors` / `sliding_tensors` index those that full-attention / sliding-window blocks live in."""

    def __init__(
        self,
        nixl: Any,
        worker_id: str,
        tensors: list[torch.Tensor],
        full_tensors: list[int],
        sliding_tensors: list[int],
    ):
        self.full_tensors, self.sliding_tensors = full_tensors, sliding_tensors
        first = tensors[0]
        if first.is_cuda:
            # NOTE: UCX finds device memory through the CUDA context current on the thread that creates the
            # agent and registers (the worker's event loop, not the engine thread that allocated the pool).
            torch.cuda.set_device(first.device)
        # Unique per process: a restarted worker keeps its worker id but is a new agent to its peers.
        name = f"{worker_id}-{uuid.uuid4().hex[:8]}"
        self.agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"]))
        self._registered = self.agent.register_memory(tensors)
        self.info = PoolInfo(
            agent=name,
            mem_type="VRAM" if first.is_cuda else "DRAM",
            device_id=first.get_device() if first.is_cuda else 0,
            addresses=[t.data_ptr() for t in tensors],
            block_bytes=first[0].numel() * first.element_size(),
            num_blocks=first.shape[0],
        )
        total = sum(t.numel() * t.element_size() for t in tensors)
        logger.info(
            "NIXL agent %s: %d KV tensors registered (%.1f MiB of %s on %s)",
            name,
            len(tensors),
            total / 2**20,
            self.info.mem_type,
            first.device,
        )

    @classmethod
    def of(cls, nixl: Any, worker_id: str, core: EngineCore) -> NixlPool:
        """The pool of an engine's KV cache."""
        return cls(nixl, worker_id, *kv_tensors(core))

    def record(self) -> dict[str, Any]:
        """What decode workers need to READ from this pool (goes into the registry record)."""
        return {
            **vars(self.info),
            "metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
        }

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self._registered)
        except Exception as e:  # noqa: BLE001 - shutting down either way
            logger.warning("NIXL deregistration failed: %s", e)


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> np.ndarray:
    """[num_runs, 3] uint64 rows (src_start, dst_start, num_blocks): the longest runs in which both the
    source's and the destination's block ids go up by one."""
    src = np.asarray(src_ids, dtype=np.int64)
    dst = np.asarray(dst_ids, dtype=np.int64)
    if src.size == 0:
        return np.zeros((0, 3), dtype=np.uint64)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return np.stack((src[starts], dst[starts], lengths), axis=1).astype(np.uint64)


def _descs(addresses: np.ndarray, starts: np.ndarray, counts: np.ndarray, block_bytes: int, device: int):
    """Nx3 (address, bytes, device) rows: each run of blocks in each tensor."""
    bb = np.uint64(block_bytes)
    addr = (addresses[:, None] + starts[None, :] * bb).reshape(-1)
    size = np.broadcast_to(counts[None, :] * bb, (len(addresses), len(starts))).reshape(-1)
    return np.stack((addr, size, np.full_like(addr, device)), axis=1)


def read_descriptors(
    local: PoolInfo,
    remote: PoolInfo,
    groups: list[tuple[list[int], Sequence[int], Sequence[int]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Local and remote Nx3 descriptor lists for one READ. `groups`: (tensor indices, source block ids,
    destination block ids) for the full-attention and the sliding-window blocks."""
    local_addr = np.asarray(local.addresses, dtype=np.uint64)
    remote_addr = np.asarray(remote.addresses, dtype=np.uint64)
    mine, theirs = [], []
    for tensors, src, dst in groups:
        runs = block_runs(src, dst)
        if not tensors or not len(runs):
            continue
        idx = np.asarray(tensors)
        mine.append(_descs(local_addr[idx], runs[:, 1], runs[:, 2], local.block_bytes, local.device_id))
        theirs.append(_descs(remote_addr[idx], runs[:, 0], runs[:, 2], remote.block_bytes, remote.device_id))
    if not mine:
        empty = np.zeros((0, 3), dtype=np.uint64)
        return empty, empty
    return np.concatenate(mine), np.concatenate(theirs)


class NixlRead:
    """One READ posted by `agent` from `remote` (descriptor lists from read_descriptors)."""

    def __init__(self, agent: Any, local: np.ndarray, local_mem: str, theirs: np.ndarray, remote: PoolInfo):
        self.agent = agent
        self.num_bytes = int(local[:, 1].sum()) if len(local) else 0
        self.num_descs = len(local)
        self.started = time.monotonic()
        try:
            self.handle = agent.initialize_xfer(
                "READ",
                agent.get_xfer_descs(local, local_mem),
                agent.get_xfer_descs(theirs, remote.mem_type),
                remote.agent,
            )
        except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
            raise _transfer_error(f"NIXL READ from {remote.agent} not prepared", e) from None
        try:
            self.state = agent.transfer(self.handle)
        except Exception as e:  # noqa: BLE001 - not posted: nothing is in flight
            self.release()
            raise _transfer_error(f"NIXL READ from {remote.agent} not posted", e) from None

    async def wait(self, deadline: float, lost: Callable[[], bool]) -> float:
        """Until the READ is done (its seconds); raises KVTransferError when it fails, `lost()` turns true,
        or `deadline` (time.monotonic()) passes. The READ may still be in flight then (`in_flight`)."""
        polls, poll = 0, POLL_MIN_S
        while self.state == "PROC":
            if lost():
                raise KVTransferError("the source disconnected mid-transfer", "source_lost")
            if time.monotonic() > deadline:
                raise KVTransferError(
                    f"NIXL READ not done in {time.monotonic() - self.started:.1f}s", "timeout"
                )
            polls += 1
            if polls <= POLL_YIELDS:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(poll)
                poll = min(2 * poll, POLL_MAX_S)
            self._check()
        if self.state != "DONE":
            raise KVTransferError(f"NIXL READ ended in state {self.state}")
        return time.monotonic() - self.started

    @property
    def in_flight(self) -> bool:
        return self.state == "PROC"

    def _check(self) -> None:
        try:
            self.state = self.agent.check_xfer_state(self.handle)
        except Exception as e:  # noqa: BLE001 - failed: nothing is in flight any more
            self.state = "ERR"
            raise _transfer_error("NIXL READ failed", e) from None

    async def drain(self) -> None:
        """Wait (without a deadline) until an abandoned READ is no longer in flight."""
        started = time.monotonic()
        while self.in_flight:
            await asyncio.sleep(POLL_MAX_S)
            try:
                self._check()
            except KVTransferError:
                break
            if time.monotonic() - started > 60:
                started = time.monotonic()
                logger.error("an abandoned NIXL READ is still running; its destination blocks stay pinned")

    def release(self) -> None:
        try:
            self.handle.release()
        except Exception as e:  # noqa: BLE001
            logger.debug("releasing a NIXL READ: %r", e)


def _transfer_error(what: str, e: Exception) -> KVTransferError:
    lost = "Disconnect" in type(e).__name__
    return KVTransferError(f"{what}: {e!r}", "source_lost" if lost else "error")


class NixlKVTransport(KVTransport):
    """READs the held blocks out of the source's registered KV pool into the (pinned) reserved blocks."""

    name = "nixl"
    pins_blocks = True

    def __init__(
        self,
        engine: AsyncEngine,
        handoff: KVHandoff,
        ctx: zmq.asyncio.Context,
        timeout_s: float,
        pool: NixlPool,
        lookup: Callable[[str], Awaitable[dict[str, Any] | None]],
    ):
        super().__init__(engine, handoff, ctx, timeout_s)
        self.pool = pool
        # worker id -> its registry record (None if it is not registered)
        self.lookup = lookup
        self._remotes: dict[str, PoolInfo] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._draining: set[asyncio.Task] = set()

    async def _remote(self, source: KVSource) -> PoolInfo:
        """The source's pool, its agent loaded here (once per source process, however many fetches ask)."""
        async with self._loading.setdefault(source.worker_id, asyncio.Lock()):
            known = self._remotes.get(source.worker_id)
            if known is None:
                known = self._remotes[source.worker_id] = await self._load(source)
            return known

    async def _load(self, source: KVSource) -> PoolInfo:
        rec = await self.lookup(source.worker_id)
        if rec is None or not rec.get("nixl"):
            raise KVTransferError(f"{source.worker_id} has no NIXL pool in the registry", "unsupported")
        info = PoolInfo.from_record(rec["nixl"])
        mine = self.pool.info
        if (info.block_bytes, len(info.addresses)) != (mine.block_bytes, len(mine.addresses)):
            raise KVTransferError(
                f"{source.worker_id}'s KV pool has {len(info.addresses)} tensors of {info.block_bytes} bytes "
                f"a block, this one {len(mine.addresses)} of {mine.block_bytes}",
                "mismatch",
            )
        try:
            # NOTE: connects to the source (UCX endpoint); a dead one fails here at once.
            name = self.pool.agent.add_remote_agent(base64.b64decode(rec["nixl"]["metadata"]))
            name = name.decode() if isinstance(name, bytes) else name
        except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
            raise KVTransferError(
                f"cannot load {source.worker_id}'s NIXL agent: {e!r}", "source_lost"
            ) from None
        if name != info.agent:
            raise KVTransferError(
                f"{source.worker_id}: agent {name!r}, record says {info.agent!r}", "mismatch"
            )
        return info

    def _forget(self, source: KVSource) -> None:
        info = self._remotes.pop(source.worker_id, None)
        if info is not None:
            try:
                self.pool.agent.remove_remote_agent(info.agent)
            except Exception as e:  # noqa: BLE001
                logger.debug("removing NIXL agent %s: %s", info.agent, e)

    async def fetch(self, source: KVSource, request_id: str, reserved: ReservedBlocks) -> FetchResult:
        read: NixlRead | None = None
        try:
            peer = self.peer(source.kv_address)
            # NOTE: the first fetch from a source looks its agent up in the registry (registry calls have
            # their own timeout); the transfer's deadline starts after that.
            remote = await self._remote(source)
            deadline = time.monotonic() + self.timeout_s
            reply, _ = await self._pull(source, deadline)
            src = (reply.full_block_ids, reply.sliding_block_ids)
            if (len(src[0]), len(src[1])) != (len(reserved.full), len(reserved.sliding)):
                raise KVTransferError(
                    f"source holds {len(src[0])} + {len(src[1])} blocks, {len(reserved.full)} + "
                    f"{len(reserved.sliding)} reserved here",
                    "mismatch",
                )
            local, theirs = read_descriptors(
                self.pool.info,
                remote,
                [
                    (self.pool.full_tensors, src[0], reserved.full),
                    (self.pool.sliding_tensors, src[1], reserved.sliding),
                ],
            )
            if not len(local):
                return FetchResult(0, 0.0)
            disconnects = peer.num_disconnects
            read = NixlRead(self.pool.agent, local, self.pool.info.mem_type, theirs, remote)
            move_s = await read.wait(deadline, lambda: peer.num_disconnects != disconnects)
            logger.debug(
                "%s: %d bytes in %d descriptors from %s in %.3f ms (%.2f GiB/s)",
                request_id,
                read.num_bytes,
                read.num_descs,
                source.worker_id,
                move_s * 1e3,
                read.num_bytes / max(move_s, 1e-9) / 2**30,
            )
            return FetchResult(read.num_bytes, move_s)
        except KVTransferError as e:
            if e.reason == "source_lost":
                self._forget(source)
            raise
        finally:
            if read is not None and read.in_flight:
                # NOTE: UCX cannot take back a READ once posted; the reserved blocks stay pinned until it has
                # completed or failed, however the wait for it ended.
                task = asyncio.ensure_future(self._drain(read, request_id))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                if read is not None:
                    read.release()
                self._end_import(request_id)

    def _end_import(self, request_id: str) -> None:
        with contextlib.suppress(EngineDeadError):
            self.engine.call_soon(lambda core: self.handoff.end_import(request_id))

    async def _drain(self, read: NixlRead, request_id: str) -> None:
        await read.drain()
        read.release()
        self._end_import(request_id)

    def close(self) -> None:
        for task in self._draining:
            task.cancel()
        super().close()
