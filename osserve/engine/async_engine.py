"""AsyncEngine: the engine for asyncio code, with the engine loop on a background thread.

The server's event loop never runs the model: requests and aborts go to the engine thread through a queue;
each step's packed outputs go through the OutputProcessor (osserve/engine/output_processor.py), which wakes
the streams that have news, once per event loop and step. A stream turns what arrived into one output when
its consumer asks, so a consumer that fell behind gets one output for many steps. A stream that is closed
before its request finishes (a client that disconnected) aborts the request, and the abort frees its KV
blocks at the start of the engine's next step.

EngineClient is the interface the server uses, whatever the engine: this class (the engine in a thread),
ProcessEngine (osserve/engine/engine_process.py: the same, with the engine loop in a child process) and the
disaggregated frontend's RemoteEngine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from osserve.config import EngineConfig
from osserve.engine.engine import EngineCore, Tokenizer
from osserve.engine.output_processor import OutputProcessor, RequestState, wake
from osserve.engine.outputs import EngineCoreOutputs, RequestOutput
from osserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until restart."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineClient(Protocol):
    """What the server needs of an engine."""

    state: str  # "loading", "ready" or "dead"
    error: str | None
    model_name: str | None
    tokenizer: Any
    num_pending: int  # requests handed over but not yet taken by the engine
    stats: dict[str, Any]  # the engine's latest figures (num_running, num_waiting, kv, num_steps, ...)

    @property
    def max_seq_len(self) -> int | None: ...

    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    async def wait_ready_async(self, timeout: float | None = None) -> None: ...
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def health_extra(self) -> dict[str, Any]: ...


@dataclass
class _Add:
    state: RequestState


@dataclass
class _Abort:
    handles: list[int]


@dataclass
class _Adopt:
    """Put a request into the core with `start(core, handle)` instead of `core.add_request` (disaggregated
    serving: a request whose KV or first tokens were computed elsewhere; see osserve/engine/handoff.py)."""

    state: RequestState
    start: Callable[[EngineCore, int], None]


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
        self.core: Any = None
        self.model_name: str | None = None
        self.state = "loading"
        self.error: str | None = None
        self.processor = OutputProcessor(tokenizer, config.stream_interval)
        self._next_handle = 0
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.stats: dict[str, Any] = {"num_running": 0, "num_waiting": 0, "kv": {}, "num_steps": 0}
        self.num_pending = 0
        # Runs on the engine thread after every step, before its outputs reach the streams; it may edit them
        # (the disaggregated prefill worker detaches requests there once they have their first token).
        self.after_step: Callable[[EngineCore, EngineCoreOutputs], None] | None = None

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

    @property
    def max_seq_len(self) -> int | None:
        return self.core.max_seq_len if self.core is not None else None

    @property
    def vocab_size(self) -> int | None:
        return self.core.vocab_size if self.core is not None else None

    def health_extra(self) -> dict[str, Any]:
        return {}

    # -- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (ContextLengthError for length) now, before the request is queued."""
        self._require_core()
        params.check_request(len(prompt_token_ids), self.vocab_size, self.max_seq_len, prompt_token_ids)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream. Validation errors raise here, synchronously."""
        self.validate(prompt_token_ids, params)
        state = self._register(request_id, list(prompt_token_ids), params, prompt)
        self._submit(_Add(state))
        return self._stream(state)

    def _register(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None
    ) -> RequestState:
        """Client-side state for a new request, woken on the caller's event loop; counted as pending until
        the engine takes it."""
        with self._lock:
            handle = self._next_handle
            state = self.processor.add(request_id, prompt_token_ids, params, prompt, handle)
            self._next_handle += params.n
            self.num_pending += 1
        state.loop = asyncio.get_running_loop()
        state.event = asyncio.Event()
        return state

    def _submit(self, item: Any) -> None:
        """Hand an add, abort or call to the engine (its inbox, in order)."""
        self._inbox.put(item)

    async def _stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; an error comes after the outputs that arrived before it."""
        finished = False
        try:
            while True:
                await state.event.wait()
                state.event.clear()
                error = state.error
                out = self.processor.make_output(state)
                if state.abort_handles:
                    handles, state.abort_handles = state.abort_handles, []
                    self._submit(_Abort(handles))
                if out is not None:
                    finished = out.finished
                    yield out
                    if finished:
                        return
                elif error is not None:
                    finished = True
                    raise error
                if error is not None:
                    state.event.set()  # the error, after this output
        finally:
            with self._lock:
                self.processor.remove(state)
            if not finished:
                self._submit(_Abort(state.handles))

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at the start of the next engine step. Its stream ends."""
        with self._lock:
            state = self.processor.requests.get(request_id)
            if state is not None:
                self.processor.remove(state)
        if state is None:
            return
        self._submit(_Abort(state.handles))
        if not state.finished:
            self.processor.abort(state)  # its stream ends with what arrived and finish_reason "abort"
            wake([state])

    def adopt(
        self,
        request_id: str,
        start: Callable[[EngineCore, int], None],
        params: SamplingParams,
        prompt_token_ids: list[int],
        restore: tuple[list[int], int, float] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Like `add_request`, but the engine thread calls `start(core, handle)` to put the request into the
        core under `handle`; a ValueError from `start` ends the stream with that error. `restore`: (output
        tokens already produced, characters of their text already sent, cumulative logprob) when the request
        continues one that ran elsewhere."""
        self._require_core()
        state = self._register(request_id, list(prompt_token_ids), params, None)
        if restore is not None:
            self.processor.restore(state, *restore)
        self._submit(_Adopt(state, start))
        return self._stream(state)

    def call_soon(self, fn: Callable[[EngineCore], Any]) -> asyncio.Future:
        """Queue `fn(core)` for the engine thread now (in order with adds and aborts); its future resolves
        with the result."""
        self._require_core()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Call(fn, loop, future))
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

    # -- outputs ---------------------------------------------------------------------------------------
    def _on_outputs(self, outs: EngineCoreOutputs) -> None:
        """One step's outputs: hand them to the processor and wake the streams that have news."""
        with self._lock:
            woken = self.processor.process(outs)
        if woken:
            wake(woken)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            states = list(self.processor.requests.values())
            for st in states:
                self.processor.fail(st, error)
        wake(states)

    # -- the engine thread -----------------------------------------------------------------------------
    def _require_core(self) -> Any:
        if self.state == "dead":
            raise EngineDeadError(self.error or "engine is dead")
        if self.core is None:
            raise EngineNotReadyError("the model is still loading")
        return self.core

    def _build(self) -> tuple[EngineCore, str]:
        """core_factory, or a one-rank engine (the server passes one that also builds parallel engines)."""
        if self._factory is not None:
            return self._factory()
        from osserve.engine.factory import build_engine

        return build_engine(self.config)

    def _run(self) -> None:
        try:
            core, self.model_name = self._build()
        except Exception as e:  # noqa: BLE001 - any load failure makes the engine dead, with the reason
            # NOTE: the reason is the server's one line (state.error); the traceback only at debug level.
            logger.debug("engine failed to load", exc_info=True)
            self.state, self.error = "dead", f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self.core = core
        self.stats = core.stats()  # /health shows the KV cache before the first step
        self.state = "ready"
        self._ready.set()
        logger.info("engine ready: serving %s", self.model_name)
        report = ProgressLog(self.stats)
        try:
            while True:
                block = not core.has_unfinished()
                t0 = time.perf_counter()
                if not self._drain(core, block):
                    break
                if block:
                    report.idle += time.perf_counter() - t0
                    self.stats = core.stats()  # new work is visible (waiting) during its first step
                outs = core.step()
                if self.after_step is not None:
                    self.after_step(core, outs)
                # NOTE: refreshed every iteration (also after aborts alone) so /metrics and /health are current.
                self.stats = core.stats()
                self._on_outputs(outs)
                report.maybe_log(self.stats)
        except Exception as e:  # noqa: BLE001
            logger.exception("engine loop failed")
            self.state, self.error = "dead", f"{type(e).__name__}: {e}"
            self._fail_all(EngineDeadError(self.error))

    def _drain(self, core: Any, block: bool) -> bool:
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
            elif isinstance(item, _Add | _Adopt):
                with self._lock:
                    self.num_pending -= 1
                st = item.state
                if self.processor.requests.get(st.request_id) is not st:  # aborted before it was added
                    continue
                try:
                    if isinstance(item, _Add):
                        core.add_request(st.request_id, st.prompt_token_ids, st.params, st.first_handle)
                    else:
                        item.start(core, st.first_handle)
                except ValueError as e:
                    with self._lock:
                        self.processor.fail(st, e)
                    wake([st])
            elif isinstance(item, _Abort):
                core.abort(item.handles)


class ProgressLog:
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


def _check_parallel_ranks(core: Any) -> None:
    """Raise if this engine is a parallel one whose ranks failed: the forward_sync that osserve.distributed
    installs on rank 0 knows its launch (`check_ranks`)."""
    check = getattr(getattr(core.runner, "forward_sync", None), "check_ranks", None)
    if check is not None:
        check()


def _run_call(call: _Call, core: Any) -> None:
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
