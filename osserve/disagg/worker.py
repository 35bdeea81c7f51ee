"""`osserve worker`: one engine behind a control endpoint, registered for frontends to route to.

Roles (what the frontend sends it; the worker itself serves any mode):
- prefill: requests stop after their first token; the prompt's KV stays held until a decode worker has
  pulled it (or the frontend releases it, or `kv_hold_timeout` passes).
- decode: requests continue from a handoff: reserve blocks, fetch the KV from the prefill worker into them
  (kv_transfer.py: ZeroMQ bytes, or a NIXL READ, kv_nixl.py), decode. Without a KV source (its prefill
  worker died), or when the fetch fails or passes its deadline, the prompt and the tokens so far are
  recomputed here instead (counted by reason).
- both: whole requests (aggregated serving; data parallel behind one frontend).

Sockets (ZeroMQ): control ROUTER (frontends' DEALERs: Generate / Abort / StatsQuery in, Output / Failed /
Stats out) and KV ROUTER (decode workers pull here). The worker registers under a lease in etcd or in the
frontend's registry, as "loading" first and "ready" once the model is up (with its NIXL agent's metadata
when its KV pool is registered). SIGTERM drains: the record says "draining" (frontends route nothing new here;
a request that arrives anyway is refused, retryably), requests in flight get `shutdown_timeout` seconds, those
still running are then answered Failed (retryable: the frontend moves them to another worker or ends them with
an error at once); then the lease is revoked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket as pysocket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from osserve.config import EngineConfig
from osserve.disagg.discovery import (
    EtcdRegistry,
    Registration,
    Registry,
    RegistryError,
    RemoteRegistry,
    bind,
    workers_prefix,
)
from osserve.disagg.kv_import import KVImporter
from osserve.disagg.kv_nixl import NixlPool, import_nixl
from osserve.disagg.kv_transfer import PULL_TIMEOUT_S, KVServer, KVTransferError
from osserve.disagg.messages import (
    ROLES,
    Abort,
    Failed,
    Generate,
    Handoff,
    KVSource,
    Output,
    Stats,
    StatsQuery,
    check_kv_transport,
    decode,
    encode,
    params_from_wire,
)
from osserve.engine.async_engine import AsyncEngine, EngineDeadError
from osserve.engine.engine import EngineCore
from osserve.engine.handoff import HandoffState, KVHandoff
from osserve.engine.outputs import RequestOutput
from osserve.engine.request import RequestStatus

logger = logging.getLogger("osserve.disagg.worker")

HASH_REFRESH_S = 0.5
# An engine thread that has not come back between two steps for this long is hung (a stuck device, say).
ENGINE_STALL_S = 120.0


@dataclass
class WorkerOptions:
    role: str = "both"
    # Address to bind (0.0.0.0 for all interfaces) and the one advertised to others (default: host, or
    # this machine's hostname when binding all interfaces).
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    # Control and KV ports; 0 picks free ones.
    port: int = 0
    kv_port: int = 0
    # Discovery: an etcd URL, else the frontend's registry address (tcp://HOST:PORT).
    etcd: str | None = None
    registry: str | None = None
    namespace: str = "default"
    lease_ttl: float = 10.0
    worker_id: str | None = None
    # How this worker pulls KV (auto | zmq | nixl) and what it serves besides ZeroMQ (nixl unless zmq).
    kv_transport: str = "auto"
    # Seconds a prefill worker holds a prompt's KV for a decode worker that never pulls it.
    kv_hold_timeout: float = 60.0
    # Seconds a decode worker's KV fetch may take (asking the source, moving, writing) before it gives up
    # and recomputes the prompt. NOTE: keep it under the prefill workers' kv_hold_timeout.
    kv_transfer_timeout: float = PULL_TIMEOUT_S
    # Test hook: seconds to wait between reserving blocks and pulling the KV (widens the transfer phase).
    debug_transfer_delay: float = 0.0
    # On SIGTERM, seconds requests in flight get to finish.
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role is {self.role!r}; allowed: {', '.join(ROLES)}")
        if (self.etcd is None) == (self.registry is None):
            raise ValueError("give exactly one of --etcd URL and --registry tcp://HOST:PORT (the frontend's)")
        check_kv_transport(self.kv_transport)
        if not self.kv_transfer_timeout > 0:
            raise ValueError(f"kv_transfer_timeout must be > 0 seconds, got {self.kv_transfer_timeout}")
        if self.worker_id is None:
            self.worker_id = f"{self.role}-{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return pysocket.gethostname() if self.host in ("0.0.0.0", "::", "*") else self.host


def check_role_fits_engine(role: str, config: EngineConfig) -> None:
    """Prefill / decode workers move KV between single-rank engines only (raises ValueError otherwise)."""
    if config.engine_process is True:
        raise ValueError(
            "engine_process applies to `osserve serve` alone: a worker already serves its engine in a process "
            "of its own; leave it false for workers"
        )
    ranks = max(config.tensor_parallel_size, config.moe_expert_parallel_size)
    if role != "both" and (ranks > 1 or config.enable_attention_dp):
        # NOTE: with several ranks each rank holds its own part of the KV (heads, or requests under attention
        # DP); moving it needs a transfer per rank pair, which is not built yet.
        raise ValueError(
            f"role {role!r} with tensor_parallel_size {config.tensor_parallel_size}, moe_expert_parallel_size "
            f"{config.moe_expert_parallel_size}, enable_attention_dp {config.enable_attention_dp}: KV transfer "
            "between multi-rank engines is not supported yet; use single-rank prefill / decode workers, or "
            "role 'both' for parallel engines"
        )


class Worker:
    def __init__(self, config: EngineConfig, opts: WorkerOptions, tokenizer: Any = None):
        self.config = config
        self.opts = opts
        self.worker_id: str = opts.worker_id or ""
        self.tokenizer = tokenizer
        self.ctx = zmq.asyncio.Context()
        self.engine: AsyncEngine | None = None
        self.handoff: KVHandoff | None = None
        self.kv_server: KVServer | None = None
        self.nixl_pool: NixlPool | None = None
        self.importer: KVImporter | None = None
        self.registry: Registry | None = None
        self.registration: Registration | None = None
        self.control: zmq.asyncio.Socket | None = None
        self.control_address = ""
        self.state = "loading"
        self.started = time.time()
        self.exit_code = 0
        self.tasks: dict[str, asyncio.Task] = {}
        self.clients: dict[str, bytes] = {}  # the frontend (control identity) of each request in `tasks`
        # What each request's task is doing: prefill (prompt being computed, here or by replay), transfer
        # (KV being reserved / pulled), decode; for the abort counts by phase.
        self.stages: dict[str, str] = {}
        self._bg: set[asyncio.Task] = set()
        # Block-hash snapshots by version, for diffs to the frontends (newest last).
        self._hash_versions: dict[int, set[int]] = {0: set()}
        self._hash_version = 0
        self._engine_stats: dict[str, Any] = {}
        self.counters: dict[str, int] = {"requests": 0, "held_expired": 0}
        self.aborted: dict[str, int] = {"queued": 0, "prefill": 0, "transfer": 0, "decode": 0}

    # -- lifecycle -------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        core = self.engine.core if self.engine is not None else None
        rec: dict[str, Any] = {
            "worker_id": self.worker_id,
            "role": self.opts.role,
            "state": self.state,
            "control_address": self.control_address,
            "hostname": pysocket.gethostname(),
            "pid": os.getpid(),
            "model": self.engine.model_name if self.engine else None,
            "max_batch_size": self.config.max_batch_size,
            "started": self.started,
        }
        if core is not None and self.kv_server is not None:
            rec.update(
                kv_address=self.kv_server.address,
                kv_transports=self.kv_server.transports,
                max_seq_len=core.max_seq_len,
                vocab_size=core.vocab_size,
                block_size=core.kv.block_size,
                num_kv_blocks=core.kv.pool.num_usable,
                device=str(core.runner.device),
            )
        if self.nixl_pool is not None:
            rec["nixl"] = self.nixl_pool.record()
        return rec

    def _registry(self) -> Registry:
        if self.opts.etcd:
            return EtcdRegistry(self.opts.etcd)
        assert self.opts.registry is not None
        return RemoteRegistry(self.opts.registry, self.ctx)

    async def run(self, stop: asyncio.Event) -> int:
        if self.tokenizer is None:
            from osserve.server.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer()
        nixl = None
        if self.opts.kv_transport != "zmq":
            nixl = import_nixl()
            if nixl is None and self.opts.kv_transport == "nixl":
                logger.error("kv_transport nixl needs NIXL: pip install nixl-cu13 (or osserve[nixl])")
                self.ctx.term()
                return 1
        self.engine = engine = AsyncEngine(self.config, self.tokenizer)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control_address = bind(self.control, f"tcp://{self.opts.host}:{self.opts.port}")
        self.control_address = self.control_address.replace(
            f"//{self.opts.host}:", f"//{self.opts.public_host}:"
        )
        self.registry = registry = self._registry()
        key = workers_prefix(self.opts.namespace) + self.worker_id
        self.registration = Registration(registry, key, self.opts.lease_ttl)
        engine.start()
        await self.registration.start(self.record())
        serving = self._spawn(self._serve_control())
        try:
            ready = self._spawn(engine.wait_ready_async())
            await asyncio.wait({ready, self._spawn(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                return 0
            if ready.exception() is not None:
                logger.error("engine failed to load: %s", ready.exception())
                self.state = "dead"
                await self.registration.update(self.record())
                return 1
            if not await self._go_ready(stop, nixl):
                self.state = "dead"
                return 1
            await stop.wait()
            if self.state == "ready":
                await self._drain()
        finally:
            logger.info("worker %s stopping", self.worker_id)
            self.state = "stopping"
            await self.registration.close()  # leave routing first
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            serving.cancel()
            for task in list(self._bg):
                task.cancel()
            await asyncio.gather(serving, *self._bg, return_exceptions=True)
            if self.kv_server is not None:
                await self.kv_server.close()
            if self.importer is not None:
                self.importer.close()
            if self.nixl_pool is not None:
                self.nixl_pool.close()
            await registry.close()
            self.control.close(0)
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            self.ctx.term()
        return self.exit_code

    async def _go_ready(self, stop: asyncio.Event, nixl: Any) -> bool:
        """Serve KV and requests (False: NIXL was asked for by name and could not be set up)."""
        engine = self.engine
        assert engine is not None and engine.core is not None
        self.handoff = handoff = KVHandoff(engine.core)
        engine.after_step = handoff.after_step
        if nixl is not None:
            try:
                self.nixl_pool = NixlPool.of(nixl, self.worker_id, engine.core)
            except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
                if self.opts.kv_transport == "nixl":
                    logger.error("kv_transport nixl: cannot register the KV pool with NIXL: %r", e)
                    return False
                logger.warning("NIXL unavailable (%r); KV moves over ZeroMQ", e)
        served = ["zmq"] + (["nixl"] if self.nixl_pool is not None else [])
        self.kv_server = KVServer(
            engine, handoff, self.ctx, f"tcp://{self.opts.host}:{self.opts.kv_port}", served
        )
        self.kv_server.address = self.kv_server.address.replace(
            f"//{self.opts.host}:", f"//{self.opts.public_host}:"
        )
        self.kv_server.start()
        self.importer = KVImporter(
            engine,
            handoff,
            self.ctx,
            self.opts.kv_transport,
            self.opts.kv_transfer_timeout,
            self.nixl_pool,
            self._record_of,
            self.opts.debug_transfer_delay,
        )
        await self._refresh()
        self._spawn(self._housekeeping(stop))
        self.state = "ready"
        assert self.registration is not None
        await self.registration.update(self.record())
        logger.info(
            "worker %s (%s) ready: control %s, kv %s",
            self.worker_id,
            self.opts.role,
            self.control_address,
            self.kv_server.address,
        )
        return True

    async def _record_of(self, worker_id: str) -> dict[str, Any] | None:
        """Another worker's registry record (for its NIXL agent's metadata)."""
        assert self.registry is not None
        key = workers_prefix(self.opts.namespace) + worker_id
        try:
            return (await self.registry.list(key)).get(key)
        except RegistryError as e:
            raise KVTransferError(f"registry: {e}") from None

    async def _drain(self) -> None:
        """Take no new requests, give those in flight `shutdown_timeout` seconds, then hand the rest back."""
        assert self.registration is not None
        self.state = "draining"
        await self.registration.update(self.record())
        logger.info("draining: %d request(s) get %g s to finish", len(self.tasks), self.opts.shutdown_timeout)
        deadline = time.monotonic() + self.opts.shutdown_timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid, ident in list(self.clients.items()):
            await self._send(ident, Failed(rid, f"worker {self.worker_id} shut down", retryable=True))

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        last_answer = time.monotonic()
        while True:
            await asyncio.sleep(HASH_REFRESH_S)
            engine = self.engine
            stalled = time.monotonic() - last_answer > ENGINE_STALL_S
            if engine is not None and (engine.state == "dead" or stalled):
                # Nothing can be served any more: leave routing and exit (non-zero) for a restart.
                why = engine.error if engine.state == "dead" else f"no step finished in {ENGINE_STALL_S:.0f}s"
                logger.error("engine failed (%s); worker %s exits", why, self.worker_id)
                self.state = "dead"
                self.exit_code = 1
                stop.set()
                return
            try:
                await self._refresh()
                last_answer = time.monotonic()
            except (TimeoutError, EngineDeadError):
                continue

    async def _refresh(self) -> None:
        """Expire held KV nobody pulled; take the stats and block hashes the frontends see."""
        engine, handoff = self.engine, self.handoff
        assert engine is not None and handoff is not None
        expired, hashes, self._engine_stats = await engine.call(
            lambda core: (
                handoff.expire(self.opts.kv_hold_timeout),
                handoff.cached_block_hashes(),
                {**core.stats(), **handoff.usage()},
            ),
            30.0,
        )
        if expired:
            self.counters["held_expired"] += len(expired)
            logger.warning(
                "released KV held for %d request(s) nobody pulled in %.0fs",
                len(expired),
                self.opts.kv_hold_timeout,
            )
        if hashes != self._hash_versions[self._hash_version]:
            self._hash_version += 1
            self._hash_versions[self._hash_version] = hashes
            for old in [v for v in self._hash_versions if v < self._hash_version - 8]:
                del self._hash_versions[old]

    # -- control plane ---------------------------------------------------------------------------------
    async def _serve_control(self) -> None:
        assert self.control is not None
        while True:
            ident, *parts = await self.control.recv_multipart()
            try:
                msg, _ = decode(parts)
            except ValueError as e:
                logger.warning("bad control message: %s", e)
                continue
            if isinstance(msg, Generate):
                if msg.request_id in self.tasks:
                    await self._send(ident, Failed(msg.request_id, "request id already running here"))
                    continue
                self.counters["requests"] += 1
                task = asyncio.ensure_future(self._serve_request(ident, msg))
                self.tasks[msg.request_id] = task
                self.clients[msg.request_id] = ident
                task.add_done_callback(lambda _t, rid=msg.request_id: self._forget(rid))
            elif isinstance(msg, Abort):
                self._spawn(self._abort(msg.request_id))
            elif isinstance(msg, StatsQuery):
                await self._send(ident, self._stats(msg))

    def _forget(self, request_id: str) -> None:
        self.tasks.pop(request_id, None)
        self.clients.pop(request_id, None)

    async def _send(self, ident: bytes, msg: Any) -> None:
        assert self.control is not None
        try:
            await self.control.send_multipart([ident, *encode(msg)])
        except zmq.ZMQError as e:
            logger.warning("control send failed: %s", e)

    def _stats(self, query: StatsQuery) -> Stats:
        # Taken on the engine thread between two steps (housekeeping), so all of it is one consistent view.
        s = dict(self._engine_stats)
        importer = self.importer
        s.update(
            num_tasks=len(self.tasks),
            counters={**self.counters, **(importer.counters() if importer is not None else {})},
            aborted=dict(self.aborted),
            kv_transfer=importer.stats.as_dict() if importer is not None else {},
        )
        if self.kv_server is not None:
            s.update(kv_pulls_served=self.kv_server.num_pulls, kv_released=self.kv_server.num_released)
        current = self._hash_versions[self._hash_version]
        known = self._hash_versions.get(query.hashes_version)
        if known is None:
            added, removed, full = sorted(current), [], True
        else:
            added, removed, full = sorted(current - known), sorted(known - current), False
        return Stats(self.worker_id, self.state, s, self._hash_version, added, removed, full)

    async def _abort(self, request_id: str) -> None:
        """Cancel a request wherever it is: running in the engine, reserved, pulling, or held for a pull."""
        task = self.tasks.get(request_id)
        # Where the request was when the abort arrived, as its task saw it (the engine may finish the step
        # that was running meanwhile).
        stage = self.stages.get(request_id)
        if task is not None:
            task.cancel()
        engine, handoff = self.engine, self.handoff
        if engine is None or handoff is None or engine.core is None or engine.state != "ready":
            return

        def phase_of(core: EngineCore) -> str | None:
            if request_id in handoff.held or request_id in handoff.reserved:
                return "transfer"
            req = core.scheduler.requests.get(request_id)
            if req is None:
                return None
            if req.status == RequestStatus.WAITING and req.num_computed_tokens == 0:
                return "queued"
            return "decode" if req.output_token_ids else "prefill"

        # Queued in this order on the engine thread: look, abort (which also ends the request's stream),
        # release held or reserved blocks.
        looked = engine.call_soon(phase_of)
        engine.abort(request_id)
        released = engine.call_soon(lambda core: handoff.release(request_id))
        try:
            done, _ = await asyncio.wait({looked, released}, timeout=30.0)
            phase = looked.result() if looked in done else None
        except EngineDeadError:
            return
        if phase != "queued" and stage is not None:
            phase = stage
        if phase is not None:
            self.aborted[phase] += 1
        logger.debug("abort %s: %s", request_id, phase or "nothing left to free")

    # -- one request -----------------------------------------------------------------------------------
    async def _serve_request(self, ident: bytes, msg: Generate) -> None:
        rid = msg.request_id
        engine, handoff, importer = self.engine, self.handoff, self.importer
        if engine is None or handoff is None or importer is None or self.state != "ready":
            await self._send(ident, Failed(rid, f"worker {self.worker_id} is {self.state}", retryable=True))
            return
        try:
            params = params_from_wire(msg.params)
            prompt = list(msg.prompt_token_ids)
            self.stages[rid] = "prefill"
            if msg.mode == "generate":
                stream = engine.add_request(rid, prompt, params)
            elif msg.mode == "prefill":
                stream = engine.adopt(
                    rid,
                    lambda core, handle: handoff.add_prefill_only(rid, prompt, params, handle),
                    params,
                    prompt,
                )
            elif msg.mode == "continue":
                if msg.handoff is None:
                    raise ValueError("mode 'continue' needs a handoff")
                h = msg.handoff
                state = HandoffState(
                    list(h.output_token_ids), h.num_sent_chars, h.cumulative_logprob, h.rng_state
                )
                self.stages[rid] = "transfer" if msg.kv_source is not None else "prefill"
                stream = await importer.continue_request(rid, prompt, params, state, msg.kv_source)
                self.stages[rid] = "decode" if msg.kv_source is not None else "prefill"
            else:
                raise ValueError(f"unknown mode {msg.mode!r}; allowed: generate, prefill, continue")
            async for out in stream:
                if out.outputs[0].token_ids:
                    self.stages[rid] = "transfer" if "handoff" in out.extra else "decode"
                await self._send(ident, self._output(rid, out))
        except asyncio.CancelledError:
            # Aborted (or shutting down): make sure nothing stays allocated whatever step we were at. The
            # engine inbox is FIFO, so these run after any adopt that was queued before.
            engine.abort(rid)
            self._spawn(engine.call(lambda core: handoff.release(rid), 30.0))
            raise
        except ValueError as e:
            await self._send(ident, Failed(rid, str(e), retryable=False))
        except (EngineDeadError, KVTransferError, TimeoutError) as e:
            await self._send(ident, Failed(rid, f"{type(e).__name__}: {e}", retryable=True))
        finally:
            self.stages.pop(rid, None)

    def _output(self, rid: str, out: RequestOutput) -> Output:
        state: HandoffState | None = out.extra.get("handoff")
        # NOTE: a copy: the engine stream that yielded `out` still reads it (`finished` ends that stream).
        # The frontend has the prompt; it is not sent back with every token.
        out = dataclasses.replace(out, prompt_token_ids=[], prompt=None, extra={})
        if state is None:
            return Output(rid, out)
        assert self.kv_server is not None
        out.finished = False  # finished here, not for the client: a decode worker continues it
        source = KVSource(self.worker_id, self.kv_server.address, rid, list(self.kv_server.transports))
        handoff = Handoff(
            state.output_token_ids, state.num_sent_chars, state.cumulative_logprob, state.rng_state
        )
        return Output(rid, out, handoff, source)


async def serve_worker(worker: Worker) -> int:
    """Run until SIGTERM / SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await worker.run(stop)
