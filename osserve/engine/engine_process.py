"""The engine loop in a process of its own (`engine_process: true`).

In one process, the engine thread (scheduling, batch preparation, read-back, detokenization) and the server
(one SSE event per request per token: JSON, HTTP framing, asyncio) take turns on the GIL: at hundreds of
running requests each waits for the other, and the GPU waits for both. `ProcessEngine` keeps AsyncEngine's
interface for the server but runs EngineCore in a child process (spawned, so CUDA starts there only):

    server process                                   engine process
    AsyncEngine API -> inbox -> forwarder thread ---pipe---> drain adds / aborts, core.step()
    asyncio queues  <- _deliver <- receiver thread <--pipe--- one message per step: outputs, errors, stats

One message per step in each direction, whatever the batch. Outputs travel without the prompt (the server
process keeps it). What cannot cross a process boundary is refused: requests with Python logits processors
(ValueError, HTTP 400), `call` / `adopt` (the disaggregated worker's hooks: workers run the engine in
process). A child that dies turns the engine dead and ends every stream with an error; the child exits when
its parent does.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from osserve.config import EngineConfig
from osserve.engine.async_engine import (
    _STOP,
    AsyncEngine,
    EngineDeadError,
    _Abort,
    _Add,
    _ProgressLog,
)
from osserve.engine.engine import EngineCore, Tokenizer
from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    """What the server reads of an engine core that lives in another process."""

    vocab_size: int
    max_seq_len: int


class ProcessEngine(AsyncEngine):
    """AsyncEngine over an EngineCore in a child process; see the module docstring."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None):
        super().__init__(config, tokenizer)
        self.core: EngineInfo | None = None  # type: ignore[assignment]
        self.process: mp.process.BaseProcess | None = None
        # The prompt of each request in flight: outputs come back without it.
        self._prompts: dict[str, tuple[list[int], str | None]] = {}
        self._stopping = False

    # -- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if params.logits_processors:
            raise ValueError(
                "logits processors (Python callables) cannot reach an engine in another process; "
                "serve with engine_process false to use them"
            )
        super().validate(prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        # NOTE: recorded first: the child may answer before super() returns.
        with self._lock:
            known = request_id in self._prompts
            if not known:
                self._prompts[request_id] = (list(prompt_token_ids), prompt)
        try:
            return super().add_request(request_id, prompt_token_ids, params, prompt)
        except BaseException:
            if not known:
                with self._lock:
                    self._prompts.pop(request_id, None)
            raise

    def adopt(self, request_id: str, start: Callable[[EngineCore], None], output_kind: Any = None) -> Any:
        raise NotImplementedError("adopt needs the engine in this process (engine_process false)")

    def call_soon(self, fn: Callable[[EngineCore], Any]) -> Any:
        raise NotImplementedError("engine calls need the engine in this process (engine_process false)")

    def shutdown(self) -> None:
        self._stopping = True
        super().shutdown()
        proc = self.process
        if proc is not None and proc.is_alive():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    # -- the bridge threads ----------------------------------------------------------------------------
    def _run(self) -> None:
        """Start the child, wait for its model, then receive its per-step messages until it stops."""
        ctx = mp.get_context("spawn")
        from_child, child_out = ctx.Pipe(duplex=False)
        child_in, to_child = ctx.Pipe(duplex=False)
        # NOTE: not daemonic: a parallel engine starts rank processes of its own from the child.
        proc = ctx.Process(
            target=_child_main,
            args=(self.config, child_in, child_out, logging.getLogger().getEffectiveLevel()),
            name="osserve-engine-core",
        )
        proc.start()
        child_in.close()
        child_out.close()
        self.process = proc
        logger.info("engine process started (pid %d)", proc.pid)
        msg = self._recv(from_child, proc, startup=True)
        if msg is None or msg[0] != "ready":
            self.state, self.error = "dead", msg[1] if msg is not None else "the engine process exited"
            logger.debug("engine failed to load: %s", self.error)  # the server says it, once
            self._ready.set()
            return
        _, self.model_name, vocab_size, max_seq_len, self.stats = msg
        self.core = EngineInfo(vocab_size, max_seq_len)
        self.state = "ready"
        self._ready.set()
        logger.info("engine ready: serving %s (engine in process %d)", self.model_name, proc.pid)
        threading.Thread(
            target=self._forward, args=(to_child,), name="osserve-engine-send", daemon=True
        ).start()
        while True:
            msg = self._recv(from_child, proc)
            if msg is None:
                break
            _, outputs, errors, self.stats = msg
            for request_id, message in errors:
                self._send(request_id, ValueError(message), final=True)
            if outputs:
                self._deliver(outputs)
        if self._stopping:
            self._fail_all(EngineDeadError("engine shut down"))
            return
        self.state = "dead"
        self.error = f"the engine process exited (exit code {proc.exitcode})"
        logger.error("%s", self.error)
        self._fail_all(EngineDeadError(self.error))

    def _recv(self, conn: Connection, proc: mp.process.BaseProcess, startup: bool = False) -> Any:
        """The child's next message; None once it has exited (or its pipe closed)."""
        while True:
            try:
                if conn.poll(0.5):
                    return conn.recv()
            except (EOFError, OSError):
                return None
            if not proc.is_alive():
                try:  # its last words may still be in the pipe
                    return conn.recv() if conn.poll(0) else None
                except (EOFError, OSError):
                    return None

    def _forward(self, conn: Connection) -> None:
        """Send queued adds and aborts to the child, in order."""
        while True:
            item = self._inbox.get()
            try:
                if item is _STOP:
                    conn.send(("stop",))
                    return
                if isinstance(item, _Add):
                    with self._lock:
                        self.num_pending -= 1
                        if item.request_id not in self._streams:  # aborted before it was sent
                            self._prompts.pop(item.request_id, None)
                            continue
                    conn.send(("add", item.request_id, item.prompt_token_ids, item.params, item.prompt))
                elif isinstance(item, _Abort):
                    conn.send(("abort", item.request_id))
            except (BrokenPipeError, OSError):
                return  # the child is gone: the receiver reports it

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            for out in outputs:
                prompt = (
                    self._prompts.pop(out.request_id, None)
                    if out.finished
                    else self._prompts.get(out.request_id)
                )
                if prompt is not None:
                    out.prompt_token_ids, out.prompt = prompt
        super()._deliver(outputs)

    def _send(self, request_id: str, item: Any, final: bool) -> None:
        if final:
            with self._lock:
                self._prompts.pop(request_id, None)
        super()._send(request_id, item, final)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._prompts.clear()
        super()._fail_all(error)


def _child_main(config: EngineConfig, inbox: Connection, outbox: Connection, log_level: int) -> None:
    """The engine process: build the engine, then drain, step and report until told to stop."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    parent = os.getppid()
    from osserve.engine.factory import build_engine
    from osserve.server.tokenizer import load_tokenizer

    try:
        core, name = build_engine(config, load_tokenizer())
    except Exception as e:  # noqa: BLE001 - any load failure is reported to the server, with the reason
        logger.debug("engine failed to load", exc_info=True)
        outbox.send(("dead", f"{type(e).__name__}: {e}"))
        return
    outbox.send(("ready", name, core.vocab_size, core.max_seq_len, core.stats()))
    report = _ProgressLog(core.stats())
    try:
        while True:
            outputs: list[RequestOutput] = []
            errors: list[tuple[str, str]] = []
            idle = not core.has_unfinished()
            timeout: float | None = 0.5 if idle else 0.0
            received = False
            t0 = time.perf_counter()
            while inbox.poll(timeout):
                item = inbox.recv()
                timeout, received = 0.0, True
                if item[0] == "stop":
                    return
                if item[0] == "add":
                    _, rid, ids, params, prompt = item
                    try:
                        core.add_request(rid, ids, params, prompt)
                    except ValueError as e:
                        errors.append((rid, str(e)))
                elif item[0] == "abort":
                    outputs += core.abort([item[1]])
            if idle:
                report.idle += time.perf_counter() - t0
                if not received:
                    if os.getppid() != parent:  # the server is gone
                        return
                    continue
            outputs += core.step()
            stats = core.stats()
            for out in outputs:  # the server process has the prompt
                out.prompt_token_ids, out.prompt = [], None
            outbox.send(("out", outputs, errors, stats))
            report.maybe_log(stats)
    except (BrokenPipeError, EOFError, OSError):
        return  # the server process is gone
