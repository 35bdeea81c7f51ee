"""AsyncEngine: the engine loop on a background thread, per-request async streams, abort.

The server's event loop never runs the model: requests and aborts go to the engine thread through a queue;
outputs come back with `call_soon_threadsafe` into one asyncio queue per request. A stream that is closed
before its request finishes (a client that disconnected) aborts the request, and the abort frees its KV
blocks at the start of the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from osserve.config import EngineConfig
from osserve.engine.engine import EngineCore, Tokenizer
from osserve.engine.outputs import RequestOutput, merge_delta
from osserve.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until restart."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Adopt:
    """Put a request into the core with `start(core)` instead of `core.add_request` (disaggregated serving:
    a request whose KV or first tokens were computed elsewhere; see osserve/engine/handoff.py)."""

    request_id: str
    start: Callable[[EngineCore], None]


@dataclass
class _Call:
    """Run `fn(core)` on the engine thread between two steps; its result or exception goes to `future`."""

    fn: Callable[[EngineCore], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


_STOP = object()


class AsyncEngine:
    """Serve requests from asyncio code. `start()` loads the model on the engine thread and returns at once;
    `state` is "loading", then "ready" (or "dead" with `error`)."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        core_factory: Callable[[], tuple[EngineCore, str]] | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self._factory = core_factory
        self.core: EngineCore | None = None
        self.model_name: str | None = None
        self.state = "loading"
        self.error: str | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.stats: dict[str, Any] = {"num_running": 0, "num_waiting": 0, "kv": {}, "num_steps": 0}
        self.num_pending = 0
        # Runs on the engine thread after every step, before the outputs are delivered; it may edit them
        # (the disaggregated prefill worker detaches requests there once they have their first token).
        self.after_step: Callable[[EngineCore, list[RequestOutput]], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="osserve-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("engine did not become ready in time")
        if self.state != "ready":
            raise EngineDeadError(self.error or "engine failed to start")

    async def wait_ready_async(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.wait_ready, timeout)

    def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout=30)

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    # -- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (ContextLengthError for length) now, before the request is queued."""
        core = self._require_core()
        params.check_request(len(prompt_token_ids), core.vocab_size, core.max_seq_len, prompt_token_ids)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream. Validation errors raise here, synchronously."""
        self.validate(prompt_token_ids, params)
        q = self._register(request_id)
        self._inbox.put(_Add(request_id, list(prompt_token_ids), params, prompt))
        return self._stream(request_id, q, params.output_kind)

    def _register(self, request_id: str) -> asyncio.Queue:
        """A new output queue for `request_id` on the caller's event loop, counted as pending until the
        engine takes the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, q)
            self.num_pending += 1
        return q

    async def _stream(
        self, request_id: str, q: asyncio.Queue, kind: OutputKind | None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs. Outputs that queued up while the consumer was busy come as one
        (deltas merged, or the latest of cumulative ones) when `kind` says how; an error comes after them."""
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                while kind is not None and not item.finished and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        q.put_nowait(nxt)  # the queue is empty now: raised on the next round
                        break
                    if kind == OutputKind.DELTA:
                        item = merge_delta(item, nxt)
                    elif kind == OutputKind.CUMULATIVE:
                        item = nxt
                    else:
                        q.put_nowait(nxt)
                        break
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at the start of the next engine step."""
        self._inbox.put(_Abort(request_id))

    def adopt(
        self, request_id: str, start: Callable[[EngineCore], None], output_kind: OutputKind | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Like `add_request`, but the engine thread calls `start(core)` to put the request into the core
        (it must register family `request_id`); a ValueError from `start` ends the stream with that error.
        `output_kind` (the request's) lets outputs that queued up come as one."""
        self._require_core()
        q = self._register(request_id)
        self._inbox.put(_Adopt(request_id, start))
        return self._stream(request_id, q, output_kind)

    def call_soon(self, fn: Callable[[EngineCore], Any]) -> asyncio.Future:
        """Queue `fn(core)` for the engine thread now (in order with adds and aborts); its future resolves
        with the result."""
        self._require_core()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Call(fn, loop, future))
        return future

    async def call(self, fn: Callable[[EngineCore], Any], timeout: float | None = None) -> Any:
        """Run `fn(core)` on the engine thread between two steps and return its result."""
        future = self.call_soon(fn)
        # NOTE: not asyncio.wait_for, which on Python 3.11 may swallow a cancellation that coincides with the
        # result: a cancelled caller must not carry on as if nothing happened.
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
        finally:
            if not future.done():
                future.cancel()
        if not done:
            raise TimeoutError(f"the engine did not run the call within {timeout}s")
        return future.result()

    # -- the engine thread -----------------------------------------------------------------------------
    def _require_core(self) -> EngineCore:
        if self.state == "dead":
            raise EngineDeadError(self.error or "engine is dead")
        if self.core is None:
            raise EngineNotReadyError("the model is still loading")
        return self.core

    def _build(self) -> tuple[EngineCore, str]:
        if self._factory is not None:
            return self._factory()
        from osserve.engine.factory import build_engine

        return build_engine(self.config, self.tokenizer)

    def _run(self) -> None:
        try:
            self.core, self.model_name = self._build()
        except Exception as e:  # noqa: BLE001 - any load failure makes the engine dead, with the reason
            # NOTE: the reason is the server's one line (state.error); the traceback only at debug level.
            logger.debug("engine failed to load", exc_info=True)
            self.state, self.error = "dead", f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self.stats = core_stats = self.core.stats()  # /health shows the KV cache before the first step
        self.state = "ready"
        self._ready.set()
        logger.info("engine ready: serving %s", self.model_name)
        core = self.core
        report = _ProgressLog(core_stats)
        try:
            while True:
                block = not core.has_unfinished()
                t0 = time.perf_counter()
                if not self._drain(core, block):
                    break
                if block:
                    report.idle += time.perf_counter() - t0
                    self.stats = core.stats()  # new work is visible (waiting) during its first step
                outputs = core.step()
                if self.after_step is not None:
                    self.after_step(core, outputs)
                # NOTE: refreshed every iteration (also after aborts alone) so /metrics and /health are current.
                self.stats = core.stats()
                if outputs:
                    self._deliver(outputs)
                report.maybe_log(self.stats)
        except Exception as e:  # noqa: BLE001
            logger.exception("engine loop failed")
            self.state, self.error = "dead", f"{type(e).__name__}: {e}"
            self._fail_all(EngineDeadError(self.error))

    def _drain(self, core: EngineCore, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    # Idle: a dead rank of a parallel engine would otherwise be noticed only at the next
                    # step, leaving /health "ready" meanwhile. Raises RankFailedError (engine -> dead).
                    _check_parallel_ranks(core)
                    continue
                return True
            block = False
            if item is _STOP:
                self._fail_all(EngineDeadError("engine shut down"))
                return False
            if isinstance(item, _Call):
                _run_call(item, core)
                continue
            if isinstance(item, _Add):
                with self._lock:
                    self.num_pending -= 1
                    if item.request_id not in self._streams:  # aborted before it was added
                        continue
                try:
                    core.add_request(item.request_id, item.prompt_token_ids, item.params, item.prompt)
                except ValueError as e:
                    self._send(item.request_id, e, final=True)
            elif isinstance(item, _Adopt):
                with self._lock:
                    self.num_pending -= 1
                    if item.request_id not in self._streams:  # aborted before it was adopted
                        continue
                try:
                    item.start(core)
                except ValueError as e:
                    self._send(item.request_id, e, final=True)
            elif isinstance(item, _Abort):
                outs = core.abort([item.request_id])
                with self._lock:
                    entry = self._streams.pop(item.request_id, None)
                if entry is not None and outs:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, outs[0])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                entry = self._streams.get(out.request_id)
                if entry is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _send(self, request_id: str, item: Any, final: bool) -> None:
        with self._lock:
            entry = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if entry is not None:
            entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for loop, q in streams.values():
            loop.call_soon_threadsafe(q.put_nowait, error)

    # -- introspection ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": self.state,
            "model": self.model_name,
            "error": self.error,
            "time": time.time(),
            **{k: v for k, v in self.stats.items() if k != "kv"},
            "kv_cache": self.stats.get("kv", {}),
        }


class _ProgressLog:
    """Every `interval` seconds of activity, one log line of what the engine did: generated tokens per
    second, steps per second, and where a step's time went (waiting for the device, host work inside the
    step, and the loop around it: adds, aborts, handing outputs to the server; idle waits excluded)."""

    def __init__(self, stats: dict[str, Any], interval: float = 10.0):
        self.interval = interval
        self.last, self.t = stats, time.perf_counter()
        self.idle = 0.0  # seconds the loop waited for work since the last line

    def maybe_log(self, stats: dict[str, Any]) -> None:
        now = time.perf_counter()
        if now - self.t < self.interval:
            return
        steps = stats["num_steps"] - self.last["num_steps"]
        if steps > 0 and logger.isEnabledFor(logging.INFO):
            wall, last = now - self.t, self.last
            step = stats["step_seconds"] - last["step_seconds"]
            wait = stats["device_wait_seconds"] - last["device_wait_seconds"]
            kv = stats.get("kv", {})
            used = 100.0 * kv.get("in_use", 0) / max(1, kv.get("total", 0))
            logger.info(
                "engine: %.1f generated tok/s, %.1f steps/s, %d running, %d waiting, KV %.1f%% used; per step: "
                "%.2f ms device wait, %.2f ms host, %.2f ms outside step()",
                (stats["num_generated_tokens"] - last["num_generated_tokens"]) / wall,
                steps / wall,
                stats["num_running"],
                stats["num_waiting"],
                used,
                1e3 * wait / steps,
                1e3 * (step - wait) / steps,
                1e3 * (wall - step - self.idle) / steps,
            )
        self.last, self.t, self.idle = stats, now, 0.0


def _check_parallel_ranks(core: EngineCore) -> None:
    """Raise if this engine is a parallel one whose ranks failed."""
    # NOTE: the launch registry is process-wide; only an engine whose forwards are synchronised across
    # ranks belongs to it (another engine in the same process must not inherit a stale failure).
    if getattr(core.runner, "forward_sync", None) is None:
        return
    from osserve.distributed.supervisor import current_launch

    launch = current_launch()
    if launch is not None:
        launch.check()


def _run_call(call: _Call, core: EngineCore) -> None:
    try:
        result, error = call.fn(core), None
    except Exception as e:  # noqa: BLE001 - handed to the caller
        result, error = None, e

    def resolve() -> None:
        if call.future.done():  # the caller timed out or was cancelled
            return
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)

    call.loop.call_soon_threadsafe(resolve)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
