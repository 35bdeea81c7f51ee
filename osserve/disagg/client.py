"""The frontend's view of its workers: one `WorkerClient` per registered worker, kept by `Cluster` in step
with the registry.

A worker leaves routing, and its requests in flight fail over (WorkerLost), as soon as any of these says it
is gone: its lease lapsed (the registry no longer lists it), its connection dropped (ZeroMQ's socket monitor
sees the disconnect of a killed process at once; ZMTP heartbeats catch a silent host), or it stopped
answering stats queries for `liveness_timeout` seconds (a hung process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from osserve.disagg.discovery import Registry, RegistryError, workers_prefix
from osserve.disagg.messages import (
    Abort,
    Failed,
    Generate,
    Output,
    Stats,
    StatsQuery,
    decode,
    encode,
)
from osserve.engine.outputs import merge_delta
from osserve.sampling_params import OutputKind

logger = logging.getLogger("osserve.disagg.frontend")

STATS_INTERVAL_S = 0.5
HEARTBEAT_MS = 1000


class WorkerLost(Exception):
    """The worker serving a request is gone; the request may be retried elsewhere."""


class WorkerFailed(Exception):
    """The worker refused or failed a request."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class WorkerClient:
    def __init__(self, record: dict[str, Any], ctx: zmq.asyncio.Context, liveness_timeout: float):
        self.record = record
        self.worker_id: str = record["worker_id"]
        self.role: str = record["role"]
        self.address: str = record["control_address"]
        self.liveness_timeout = liveness_timeout
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 200)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(self.address)
        self.connected = False
        self.alive = True
        self.lost_reason: str | None = None
        self.last_answer = time.monotonic()
        self.stats: dict[str, Any] = {}
        # The state in the worker's last stats answer (fresher than its registry record).
        self.reported_state = "unknown"
        self.cached_hashes: set[int] = set()
        self.hashes_version = -1
        self.num_inflight = 0
        self._streams: dict[str, asyncio.Queue] = {}
        self._tasks = [asyncio.ensure_future(f()) for f in (self._read, self._watch_connection, self._poll)]

    # -- what the router sees --------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return int(self.record.get("block_size") or 16)

    @property
    def ready(self) -> bool:
        # Stats with KV usage: it has answered since it became ready.
        return (
            self.record.get("state") == "ready"
            and self.reported_state == "ready"
            and self.connected
            and self.alive
            and "kv" in self.stats
        )

    @property
    def load(self) -> float:
        """Requests in flight from this frontend, or what the worker reports if more (other frontends)."""
        reported = self.stats.get("num_running", 0) + self.stats.get("num_waiting", 0)
        return max(self.num_inflight, reported)

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "ready": self.ready,
            "state": self.record.get("state"),
            "connected": self.connected,
            "alive": self.alive,
            "address": self.address,
            "kv_address": self.record.get("kv_address"),
            "hostname": self.record.get("hostname"),
            "pid": self.record.get("pid"),
            "device": self.record.get("device"),
            "num_inflight": self.num_inflight,
            "num_running": s.get("num_running", 0),
            "num_waiting": s.get("num_waiting", 0),
            "num_held": s.get("num_held", 0),
            "num_reserved": s.get("num_reserved", 0),
            "kv_cache": s.get("kv", {}),
            "num_cached_block_hashes": len(self.cached_hashes),
            "aborted": s.get("aborted", {}),
            "counters": s.get("counters", {}),
            "kv_transfer": s.get("kv_transfer", {}),
            "kv_pulls_served": s.get("kv_pulls_served", 0),
            "kv_released": s.get("kv_released", 0),
            "seconds_since_answer": round(time.monotonic() - self.last_answer, 2),
        }

    # -- requests --------------------------------------------------------------------------------------
    async def stream(self, msg: Generate) -> AsyncIterator[Output]:
        """Send a request and yield its outputs until one is finished (or carries a handoff). Raises
        WorkerLost / WorkerFailed. Closing the iterator early aborts the request on the worker."""
        rid = msg.request_id
        if not self.alive:
            raise WorkerLost(f"worker {self.worker_id} is gone: {self.lost_reason}")
        q: asyncio.Queue = asyncio.Queue()
        delta = msg.params.get("output_kind") == OutputKind.DELTA.value
        self._streams[rid] = q
        self.num_inflight += 1
        done = False
        try:
            await self.socket.send_multipart(encode(msg))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    # A worker that stopped answering may still be running it: abort there too.
                    done = not isinstance(item, WorkerLost)
                    raise item
                if delta:
                    item = _coalesce(item, q)
                # Decided before the yield: a consumer that stops at the last output must not abort.
                done = item.output.finished or item.handoff is not None
                yield item
                if done:
                    return
        finally:
            self._streams.pop(rid, None)
            self.num_inflight -= 1
            if not done:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Tell the worker to drop a request and free its blocks (also KV it holds for a decode worker)."""
        try:
            self.socket.send_multipart(encode(Abort(request_id)), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("abort of %s on %s not sent: %s", request_id, self.worker_id, e)

    def lose(self, reason: str) -> None:
        """Mark the worker gone and fail its streams over."""
        if self.alive:
            logger.warning(
                "worker %s (%s) lost: %s; %d request(s) in flight fail over",
                self.worker_id,
                self.role,
                reason,
                len(self._streams),
            )
        self.alive = False
        self.lost_reason = reason
        for q in self._streams.values():
            q.put_nowait(WorkerLost(f"worker {self.worker_id} lost: {reason}"))

    # -- background ------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            parts = await self.socket.recv_multipart()
            try:
                msg, _ = decode(parts)
            except ValueError as e:
                logger.warning("bad message from %s: %s", self.worker_id, e)
                continue
            self.last_answer = time.monotonic()
            if isinstance(msg, Stats):
                self._take_stats(msg)
                continue
            q = self._streams.get(msg.request_id)
            if q is None:
                continue  # a request that was aborted or failed over
            if isinstance(msg, Failed):
                q.put_nowait(WorkerFailed(msg.message, msg.retryable))
            elif isinstance(msg, Output):
                q.put_nowait(msg)

    def _take_stats(self, msg: Stats) -> None:
        self.stats = msg.stats
        self.reported_state = msg.state
        if msg.hashes_full:
            self.cached_hashes = set(msg.hashes_added)
        else:
            self.cached_hashes.difference_update(msg.hashes_removed)
            self.cached_hashes.update(msg.hashes_added)
        self.hashes_version = msg.hashes_version
        if not self.alive and self.connected:
            # Back after a network blip or a pause shorter than its lease (requests in flight then have
            # already failed over; a worker that restarted registers under a new id).
            logger.info("worker %s answers again", self.worker_id)
            self.alive, self.lost_reason = True, None

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                # Killed, or its host silent past the heartbeat timeout.
                self.lose("connection dropped")

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(zmq.ZMQError):
                await self.socket.send_multipart(encode(StatsQuery(self.hashes_version)))
            await asyncio.sleep(STATS_INTERVAL_S)
            silent = time.monotonic() - self.last_answer
            if self.alive and silent > self.liveness_timeout:
                self.lose(f"no answer for {silent:.1f}s")

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


class Cluster:
    """The registered workers, refreshed from the registry every `poll_interval` seconds."""

    def __init__(
        self,
        registry: Registry,
        namespace: str,
        ctx: zmq.asyncio.Context,
        served_model_name: str,
        liveness_timeout: float = 10.0,
        poll_interval: float = 0.5,
    ):
        self.registry = registry
        self.prefix = workers_prefix(namespace)
        self.ctx = ctx
        self.served_model_name = served_model_name
        self.liveness_timeout = liveness_timeout
        self.poll_interval = poll_interval
        self.workers: dict[str, WorkerClient] = {}
        # Registered workers the frontend will not route to (another model), with the reason.
        self.rejected: dict[str, str] = {}
        self.registry_error: str | None = None
        self.last_refresh: float | None = None
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep watching whatever happens
                logger.exception("registry refresh failed")
            await asyncio.sleep(self.poll_interval)

    async def refresh(self) -> None:
        try:
            records = await self.registry.list(self.prefix)
        except RegistryError as e:
            # Keep routing to the workers we know: a registry outage must not stop requests.
            if self.registry_error is None:
                logger.warning(
                    "registry unavailable (%s); keeping the last known %d worker(s)", e, len(self.workers)
                )
            self.registry_error = str(e)
            return
        if self.registry_error is not None:
            logger.info("registry reachable again")
        self.registry_error = None
        self.last_refresh = time.monotonic()
        seen = {}
        for key, rec in records.items():
            wid = rec.get("worker_id") or key[len(self.prefix) :]
            model = rec.get("model")
            if model is not None and model != self.served_model_name:
                self.rejected[wid] = f"serves {model!r}, this frontend serves {self.served_model_name!r}"
                continue
            if not rec.get("control_address") or rec.get("role") not in ("prefill", "decode", "both"):
                self.rejected[wid] = "incomplete record"
                continue
            seen[wid] = rec
        for wid in [w for w in self.workers if w not in seen]:
            client = self.workers.pop(wid)
            client.lose("lease lapsed or deregistered")
            # Closed a little later, so that the aborts of its failed-over requests still go out (a worker
            # that was only cut off then frees their blocks).
            self._closing.add(asyncio.ensure_future(_close_later(client, 1.0)))
            logger.info("worker %s left", wid)
        for wid, rec in seen.items():
            self.rejected.pop(wid, None)
            client = self.workers.get(wid)
            if client is not None and (client.address, client.record.get("pid")) != (
                rec["control_address"],
                rec.get("pid"),
            ):
                # The same id registered by a new process (a restarted worker): talk to the new one.
                client.lose("restarted")
                self._closing.add(asyncio.ensure_future(_close_later(self.workers.pop(wid), 1.0)))
                client = None
            if client is None:
                self.workers[wid] = WorkerClient(rec, self.ctx, self.liveness_timeout)
                logger.info(
                    "worker %s joined: %s at %s (%s)",
                    wid,
                    rec["role"],
                    rec["control_address"],
                    rec.get("state"),
                )
            else:
                client.record = rec
        for wid in [w for w in self.rejected if w not in records and w not in seen]:
            self.rejected.pop(wid, None)

    def ready(self, *roles: str) -> list[WorkerClient]:
        return [w for w in self.workers.values() if w.role in roles and w.ready]

    def limits(self) -> tuple[int, int] | None:
        """(vocab_size, max_seq_len) every ready worker accepts, or None with none ready."""
        recs = [w.record for w in self.workers.values() if w.ready and w.record.get("max_seq_len")]
        if not recs:
            return None
        return min(r["vocab_size"] for r in recs), min(r["max_seq_len"] for r in recs)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        for client in self.workers.values():
            await client.close()
        self.workers.clear()


def _coalesce(item: Output, q: asyncio.Queue) -> Output:
    """`item` merged with the delta outputs already queued behind it (up to a finished one, one with a
    handoff, or an error, which stays queued): a frontend behind on hundreds of streams sends one SSE event
    per request for all it has, not one per token."""
    while item.handoff is None and not item.output.finished and not q.empty():
        nxt = q.get_nowait()
        if isinstance(nxt, BaseException):
            q.put_nowait(nxt)  # the queue was empty behind it: still next
            break
        item = Output(item.request_id, merge_delta(item.output, nxt.output), nxt.handoff, nxt.kv_source)
    return item


async def _close_later(client: WorkerClient, delay: float) -> None:
    await asyncio.sleep(delay)
    await client.close()
