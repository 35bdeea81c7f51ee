"""RemoteEngine: AsyncEngine's interface (validate, add_request -> stream of RequestOutput, abort, state,
stats, start / shutdown) over remote workers, so the OpenAI server runs unchanged in front of them.

One request, disaggregated: a prefill worker (KV-aware or least-loaded pick) computes the prompt and the
first token, which streams to the client at once; a decode worker then pulls the prompt's KV from it and
streams the rest. Aggregated (only `both` workers): one worker does it all.

Failures. A worker lost mid-request (WorkerLost) or failing it in a retryable way does not end the request:
- before the first token: the prefill runs again elsewhere;
- after it: a decode worker continues from the tokens the client already has ("replay": it recomputes the
  prompt and those tokens when the prefill worker's KV is no longer there), so greedy output is unchanged.
A new request waits up to `retry_timeout` seconds for a worker of the role it needs; a request that failed
over continues only on another worker that is ready at once, else it ends with an error output right away
(as it does after `max_retries` failures): a client should not wait on a stream that cannot move. Closing a stream (client gone) aborts the request
on every worker involved, which frees its blocks there, also mid-transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from osserve.disagg.client import Cluster, WorkerClient, WorkerFailed, WorkerLost
from osserve.disagg.discovery import EtcdRegistry, MemoryRegistry, Registry, RegistryServer
from osserve.disagg.messages import Generate, Handoff, KVSource, params_to_wire
from osserve.disagg.router import Router
from osserve.engine.async_engine import EngineNotReadyError
from osserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, merge_completion
from osserve.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger("osserve.disagg.frontend")

# (name shown in /health, roles that can fill it)
DISAGG_NEEDS = (("prefill", ("prefill",)), ("decode", ("decode", "both")))
AGG_NEEDS = (("both", ("both",)),)


@dataclass
class FrontendSettings:
    router_mode: str = "round-robin"
    # Discovery: an etcd URL, else a registry inside the frontend served at `registry_address`.
    etcd: str | None = None
    registry_address: str = "tcp://127.0.0.1:0"
    namespace: str = "default"
    # Roles the deployment needs ready to be healthy: None = infer from the registered workers.
    expect_roles: tuple[str, ...] | None = None
    # A worker that has not answered for this long is treated as gone.
    liveness_timeout: float = 10.0
    # How long a request waits for a worker of the role it needs (start, or after a failure).
    retry_timeout: float = 5.0
    max_retries: int = 3
    kv_load_weight: float = 1.0


@dataclass
class _Progress:
    """What the client has been sent of one request so far."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    cumulative_logprob: float = 0.0
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    def take(self, out: RequestOutput, cumulative: bool) -> None:
        o = out.outputs[0]
        if cumulative:
            self.token_ids, self.num_chars = list(o.token_ids), len(o.text)
        else:
            self.token_ids += o.token_ids
            self.num_chars += len(o.text)
        if o.cumulative_logprob is not None:
            self.cumulative_logprob = o.cumulative_logprob
        if self.token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()


class NoWorkerError(RuntimeError):
    pass


class RemoteEngine:
    """Routes requests to registered workers; see the module docstring."""

    def __init__(self, settings: FrontendSettings, served_model_name: str, tokenizer: Any):
        self.settings = settings
        self.model_name = served_model_name
        self.tokenizer = tokenizer
        self.router = Router(settings.router_mode, settings.kv_load_weight)
        # AsyncEngine attributes the server reads.
        self.core = None
        self.error: str | None = None
        self.num_pending = 0
        self.ctx: zmq.asyncio.Context | None = None
        self.registry: Registry | None = None
        self.registry_server: RegistryServer | None = None
        self.cluster: Cluster | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ever_ready = False
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        self.num_requests = 0
        self.num_failovers = 0
        # Run (on the shutdown thread) before discovery stops: the launcher stops its workers there, while
        # they can still deregister.
        self.before_shutdown: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start discovery (in the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self.ctx = zmq.asyncio.Context()
        s = self.settings
        if s.etcd:
            self.registry = EtcdRegistry(s.etcd)
        else:
            memory = MemoryRegistry()
            self.registry = memory
            self.registry_server = RegistryServer(memory, self.ctx, s.registry_address)
            self.registry_server.start()
            logger.info(
                "worker registry at %s (workers: --registry %s)",
                self.registry_server.address,
                self.registry_server.address,
            )
        self.cluster = Cluster(self.registry, s.namespace, self.ctx, self.model_name, s.liveness_timeout)
        self.cluster.start()

    async def aclose(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        if self.registry_server is not None:
            await self.registry_server.close()
        if self.registry is not None:
            await self.registry.close()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def shutdown(self) -> None:
        """Stop (from any thread, as the server's lifespan calls it)."""
        for fn in self.before_shutdown:
            fn()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                loop.create_task(self.aclose())
                return
        except RuntimeError:
            pass
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=15)

    async def wait_ready_async(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_ready:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deployment not ready: missing {', '.join(self.missing_roles())}")
            await asyncio.sleep(0.1)

    # -- state -----------------------------------------------------------------------------------------
    def needs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        roles = self.settings.expect_roles
        if roles is None:
            seen = {w.role for w in self.cluster.workers.values()} if self.cluster else set()
            roles = ("prefill", "decode") if seen & {"prefill", "decode"} else ("both",)
        return DISAGG_NEEDS if "prefill" in roles or "decode" in roles else AGG_NEEDS

    def missing_roles(self) -> list[str]:
        if self.cluster is None:
            return [name for name, _ in self.needs()]
        return [name for name, roles in self.needs() if not self.cluster.ready(*roles)]

    @property
    def state(self) -> str:
        if self.cluster is not None and not self.missing_roles():
            self._ever_ready = True
            self.error = None
            return "ready"
        missing = ", ".join(self.missing_roles())
        self.error = f"no ready {missing} worker" + ("" if self._ever_ready else " yet")
        # "loading" until the deployment was complete once; after that a missing role is an outage.
        return "dead" if self._ever_ready else "loading"

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def stats(self) -> dict[str, Any]:
        workers = list(self.cluster.workers.values()) if self.cluster else []
        kv: dict[str, int] = {}
        # The decode workers' KV fetches and fallbacks ({"bytes": {"nixl": n}, "fallbacks": {"timeout": n}...}).
        # NOTE: the sums drop a worker that left, as a restarted process's counters would.
        transfer: dict[str, dict[str, float]] = {}
        for w in workers:
            for k, v in w.stats.get("kv", {}).items():
                kv[k] = kv.get(k, 0) + v
            for what, by_label in w.stats.get("kv_transfer", {}).items():
                sums = transfer.setdefault(what, {})
                for label, v in by_label.items():
                    sums[label] = sums.get(label, 0) + v
        return {
            "num_running": sum(w.stats.get("num_running", 0) for w in workers),
            "num_waiting": sum(w.stats.get("num_waiting", 0) for w in workers) + self.num_pending,
            "num_steps": sum(w.stats.get("num_steps", 0) for w in workers),
            "kv": kv,
            "kv_transfer": transfer,
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": self.state,
            "model": self.model_name,
            "error": self.error,
            "time": time.time(),
            **self.health_extra(),
        }

    def health_extra(self) -> dict[str, Any]:
        """The deployment part of GET /health: every registered endpoint with its role and readiness."""
        cluster = self.cluster
        workers = sorted(cluster.workers.values(), key=lambda w: (w.role, w.worker_id)) if cluster else []
        return {
            "deployment": {
                "router_mode": self.router.mode,
                "discovery": self.registry.description if self.registry else None,
                "registry_error": cluster.registry_error if cluster else None,
                "needed_roles": [name for name, _ in self.needs()],
                "missing_roles": self.missing_roles(),
                "num_requests": self.num_requests,
                "num_failovers": self.num_failovers,
            },
            "endpoints": [w.describe() for w in workers],
            "rejected_endpoints": dict(cluster.rejected) if cluster else {},
        }

    # -- requests --------------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence every ready worker accepts (None until one is ready)."""
        limits = self.cluster.limits() if self.cluster is not None else None
        return limits[1] if limits is not None else None

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        limits = self.cluster.limits() if self.cluster else None
        if limits is None or not self.is_ready:
            raise EngineNotReadyError(self.error or "no ready worker")
        vocab_size, max_seq_len = limits
        params.check_request(len(prompt_token_ids), vocab_size, max_seq_len, prompt_token_ids)
        params_to_wire(params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Route a request; validation errors raise here. The stream's last output is finished (with
        `error` set if it failed)."""
        self.validate(prompt_token_ids, params)
        self.num_requests += 1
        return self._run(request_id, list(prompt_token_ids), params, prompt)

    def abort(self, request_id: str) -> None:
        """Stop a request; closing its stream (which the server does) aborts it on the workers."""
        if request_id in self._running:
            self._aborted.add(request_id)

    async def _run(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None
    ) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        final_only = params.output_kind == OutputKind.FINAL_ONLY
        cumulative = params.output_kind == OutputKind.CUMULATIVE
        wire_kind = OutputKind.DELTA if final_only else params.output_kind
        subs = []
        for i in range(params.n):
            # The engine's rule for n > 1 samples: consecutive seeds.
            seed = params.seed + i if params.seed is not None else None
            sub = dataclasses.replace(params, n=1, output_kind=wire_kind, seed=seed)
            subs.append(self._one(f"{rid}-{i}" if params.n > 1 else rid, prompt_ids, sub, cumulative))
        merged = _merge(subs)
        acc: dict[int, CompletionOutput] = {}
        first_token_time: float | None = None
        self._running.add(rid)
        try:
            async for index, out in merged:
                if rid in self._aborted:
                    return
                o = out.outputs[0]
                o.index = index
                if first_token_time is None and o.token_ids:
                    first_token_time = time.monotonic()
                done = out.finished
                out.request_id, out.prompt, out.prompt_token_ids = rid, prompt, prompt_ids
                if final_only:
                    acc[index] = merge_completion(acc[index], o) if index in acc else o
                    if not done and not out.error:
                        continue
                    out.outputs = [acc[i] for i in sorted(acc)]
                out.metrics = RequestMetrics(arrival, first_token_time, time.monotonic() if done else None)
                yield out
                if done and out.error is not None:
                    return
        finally:
            self._running.discard(rid)
            self._aborted.discard(rid)
            await merged.aclose()

    async def _one(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, cumulative: bool
    ) -> AsyncIterator[RequestOutput]:
        """One sample (n = 1) through prefill and decode workers, failing over as the module says."""
        wire = params_to_wire(params)
        progress = _Progress()
        source: KVSource | None = None
        source_worker: WorkerClient | None = None
        rng_state: bytes | None = None
        failed: set[str] = set()  # workers that failed this request: others first
        failures = 0
        attempt = 0
        try:
            while True:
                attempt += 1
                wire_id = f"{rid}#{attempt}"
                try:
                    if not progress.token_ids:
                        worker, msg = await self._first_stage(wire_id, prompt_ids, wire, failed)
                    else:
                        avoid = failed | ({source_worker.worker_id} if source_worker is not None else set())
                        worker = await self._pick(
                            ("decode", "both"), prompt_ids, use_kv=False, avoid=avoid, wait=not failures
                        )
                        fresh = len(progress.token_ids) == 1 and source is not None
                        handoff = Handoff(
                            list(progress.token_ids),
                            progress.num_chars,
                            progress.cumulative_logprob,
                            rng_state if fresh else None,
                        )
                        msg = Generate(
                            wire_id, "continue", prompt_ids, wire, handoff, source if fresh else None
                        )
                    async for m in worker.stream(msg):
                        out = m.output
                        progress.take(out, cumulative)
                        if msg.mode != "continue":
                            progress.num_cached_tokens = out.num_cached_tokens
                        out.num_cached_tokens = progress.num_cached_tokens
                        if m.handoff is not None:
                            source, source_worker, rng_state = m.kv_source, worker, m.handoff.rng_state
                        yield out
                        if out.finished:
                            return
                    # A prefill ended with a handoff: on to a decode worker (not a failure).
                except (WorkerLost, WorkerFailed) as e:
                    if isinstance(e, WorkerFailed) and not e.retryable:
                        yield _error(rid, str(e))
                        return
                    failures += 1
                    failed.add(worker.worker_id)
                    self.num_failovers += 1
                    if isinstance(e, WorkerLost) and source_worker is not None and not source_worker.alive:
                        source, source_worker = None, None  # its held KV died with it: replay instead
                    logger.warning(
                        "request %s: %s; failing over (%d/%d) with %d token(s) already sent",
                        rid,
                        e,
                        failures,
                        self.settings.max_retries,
                        len(progress.token_ids),
                    )
                    if failures > self.settings.max_retries:
                        yield _error(rid, f"gave up after {failures} failures; last: {e}")
                        return
                except NoWorkerError as e:
                    yield _error(rid, str(e))
                    return
        finally:
            # The prefill worker may still hold this request's KV (decode never pulled it): free it.
            if source is not None and source_worker is not None and source_worker.alive:
                source_worker.abort(source.request_id)

    async def _first_stage(
        self, wire_id: str, prompt_ids: list[int], wire: dict[str, Any], avoid: set[str]
    ) -> tuple[WorkerClient, Generate]:
        """Prefill on a prefill worker when a decode worker is there to continue; else a whole request on a
        `both` worker. A request that already failed (`avoid`) waits for none."""
        assert self.cluster is not None
        cluster = self.cluster
        wait = not avoid

        def disaggregated() -> bool:
            return bool(cluster.ready("prefill") and cluster.ready("decode", "both"))

        what = "prefill and decode" if self.needs() is DISAGG_NEEDS else "both"
        if wait:
            await self._wait_for(lambda: disaggregated() or bool(cluster.ready("both")), what)
        if disaggregated():
            worker = await self._pick(("prefill",), prompt_ids, use_kv=True, avoid=avoid, wait=wait)
            return worker, Generate(wire_id, "prefill", prompt_ids, wire)
        worker = await self._pick(("both",), prompt_ids, use_kv=True, avoid=avoid, wait=wait)
        return worker, Generate(wire_id, "generate", prompt_ids, wire)

    async def _wait_for(self, ok: Any, what: str) -> None:
        deadline = time.monotonic() + self.settings.retry_timeout
        self.num_pending += 1
        try:
            while not ok():
                if time.monotonic() > deadline:
                    raise NoWorkerError(f"no ready {what} worker within {self.settings.retry_timeout:.0f}s")
                await asyncio.sleep(0.05)
        finally:
            self.num_pending -= 1

    async def _pick(
        self,
        roles: tuple[str, ...],
        prompt_ids: list[int],
        use_kv: bool,
        avoid: frozenset[str] | set[str] = frozenset(),
        wait: bool = True,
    ) -> WorkerClient:
        """A ready worker of `roles`, waiting up to retry_timeout for one; those in `avoid` only if no other
        is ready. Without `wait` (failing over): one ready now outside `avoid`, else NoWorkerError."""
        assert self.cluster is not None
        cluster = self.cluster
        if wait:
            await self._wait_for(lambda: bool(cluster.ready(*roles)), " or ".join(roles))
        candidates = cluster.ready(*roles)
        others = [w for w in candidates if w.worker_id not in avoid]
        if not wait and not others:
            raise NoWorkerError(f"no other ready {' or '.join(roles)} worker to continue on")
        return self.router.pick(others or candidates, prompt_ids, use_kv=use_kv)  # type: ignore[return-value]


def _error(rid: str, message: str) -> RequestOutput:
    return RequestOutput(
        request_id=rid,
        prompt=None,
        prompt_token_ids=[],
        prompt_logprobs=None,
        outputs=[CompletionOutput(0, "", [], None, None, finish_reason="error")],
        finished=True,
        error=message,
    )


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(sample index, output) from the n samples' streams as they come; finished only when all are."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    finished: set[int] = set()
    try:
        ended = 0
        while ended < len(streams):
            i, out = await queue.get()
            if out is None:
                ended += 1
                continue
            if out.finished:
                finished.add(i)
            out.finished = len(finished) == len(streams)
            yield i, out
            if out.error is not None:
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
