"""The engine loop in a process of its own (`engine_process: true`, the default for a CUDA engine).

In one process the engine loop (scheduling, batch preparation, read-back) and the server (JSON, HTTP
framing, asyncio, Harmony parsing) take turns on the GIL: at hundreds of running requests each waits for the
other, and the GPU waits for both. `ProcessEngine` keeps AsyncEngine's interface for the server but runs
EngineCore in a child process (spawned, so CUDA starts there only), which works in token ids only:

    server process                                      engine process
    add_request / abort -> PUSH --ipc (msgpack)--> PULL: drain adds / aborts, core.step()
    streams <- OutputProcessor <- receiver thread <- PULL <--ipc-- PUSH: one EngineCoreOutputs per step

One ZeroMQ message per step from the engine, whatever the batch: packed arrays of handles, tokens and finish
codes (and logprobs only where asked), MessagePack-encoded with msgspec. Detokenization, stop strings and
logprob formatting happen in the server process (osserve/engine/output_processor.py); a stop string found
there aborts the sample in the engine. What cannot cross a process boundary is refused: requests with Python
logits processors (ValueError, HTTP 400), `call` / `adopt` (the disaggregated worker's hooks: workers run
the engine in process). A child that dies turns the engine dead and ends every stream with an error; the
child exits when its parent does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import zmq

from osserve.config import EngineConfig
from osserve.engine.async_engine import (
    _STOP,
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    ProgressLog,
    _Abort,
    _Add,
)
from osserve.engine.engine import EngineCore, Tokenizer
from osserve.engine.outputs import RequestOutput, decode_outputs, encode_outputs
from osserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ENCODER = msgspec.msgpack.Encoder()


class ProcessEngine(AsyncEngine):
    """AsyncEngine over an EngineCore in a child process; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        builder: Callable[[EngineConfig], tuple[Any, str]] | None = None,
    ):
        """builder: what the child builds its engine with, a module-level function (it is pickled by name);
        default: a one-rank engine (osserve.engine.factory.build_engine); the server passes
        osserve.distributed.launcher.make_engine, which also starts the ranks of a parallel engine."""
        super().__init__(config, tokenizer)
        self._builder = builder
        self.process: mp.process.BaseProcess | None = None
        self._info: tuple[int, int] | None = None  # the child's (vocab_size, max_seq_len)
        self._stopping = False
        self._ctx = zmq.Context()
        self._to_child: zmq.Socket | None = None
        self._send_lock = threading.Lock()

    @property
    def max_seq_len(self) -> int | None:
        return self._info[1] if self._info is not None else None

    @property
    def vocab_size(self) -> int | None:
        return self._info[0] if self._info is not None else None

    # -- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if params.logits_processors:
            raise ValueError(
                "logits processors (Python callables) cannot reach an engine in another process; "
                "serve with engine_process false to use them"
            )
        super().validate(prompt_token_ids, params)

    def _require_core(self) -> Any:
        if self.state == "dead":
            raise EngineDeadError(self.error or "engine is dead")
        if self._info is None:
            raise EngineNotReadyError("the model is still loading")
        return None

    def adopt(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise NotImplementedError("adopt needs the engine in this process (engine_process false)")

    def call_soon(self, fn: Callable[[EngineCore], Any]) -> Any:
        raise NotImplementedError("engine calls need the engine in this process (engine_process false)")

    def _submit(self, item: Any) -> None:
        """Send an add or abort to the child, in order (any thread)."""
        if isinstance(item, _Add):
            st = item.state
            msg: list[Any] = ["add", st.request_id, st.first_handle, st.prompt_token_ids, st.params.to_wire()]
        elif isinstance(item, _Abort):
            msg = ["abort", item.handles]
        elif item is _STOP:
            msg = ["stop"]
        else:
            raise NotImplementedError(f"{type(item).__name__} cannot reach an engine in another process")
        with self._send_lock:
            if isinstance(item, _Add):
                self.num_pending -= 1
            sock = self._to_child
            if sock is None:
                return
            # NOTE: a failed send means the child is gone; the receiver reports that.
            with contextlib.suppress(zmq.ZMQError):
                sock.send(_ENCODER.encode(msg), flags=zmq.NOBLOCK)

    def shutdown(self) -> None:
        self._stopping = True
        if self._to_child is not None:
            self._submit(_STOP)
        proc = self.process
        if proc is not None and proc.is_alive():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the receiver thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        """Start the child, wait for its model, then take its per-step messages until it stops."""
        base = os.path.join(tempfile.gettempdir(), f"osserve-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        to_addr, from_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        # NOTE: no high-water marks: a burst of adds must never be dropped (a lost add is a stream that never
        # ends), nor may the engine block on a busy server.
        to_child = self._ctx.socket(zmq.PUSH)
        to_child.setsockopt(zmq.LINGER, 0)
        to_child.setsockopt(zmq.SNDHWM, 0)
        to_child.bind(to_addr)
        from_child = self._ctx.socket(zmq.PULL)
        from_child.setsockopt(zmq.LINGER, 0)
        from_child.setsockopt(zmq.RCVHWM, 0)
        from_child.bind(from_addr)
        ctx = mp.get_context("spawn")
        # NOTE: not daemonic: a parallel engine starts rank processes of its own from the child.
        proc = ctx.Process(
            target=_child_main,
            args=(self.config, to_addr, from_addr, logging.getLogger().getEffectiveLevel(), self._builder),
            name="osserve-engine-core",
        )
        proc.start()
        self.process = proc
        logger.info("engine process started (pid %d)", proc.pid)
        try:
            self._receive(from_child, to_child, proc)
        finally:
            with self._send_lock:
                self._to_child = None
            to_child.close(0)
            from_child.close(0)
            for path in (f"{base}-in", f"{base}-out"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _receive(self, sock: zmq.Socket, to_child: zmq.Socket, proc: mp.process.BaseProcess) -> None:
        msg = self._recv(sock, proc)
        if msg is None or msg[0] != b"ready":
            why = msgspec.msgpack.decode(msg[1]) if msg is not None else "the engine process exited"
            self.state, self.error = "dead", why
            logger.debug("engine failed to load: %s", self.error)  # the server says it, once
            self._ready.set()
            return
        self.model_name, vocab_size, max_seq_len, self.stats = msgspec.msgpack.decode(msg[1])
        self._info = (vocab_size, max_seq_len)
        with self._send_lock:
            self._to_child = to_child
        self.state = "ready"
        self._ready.set()
        logger.info("engine ready: serving %s (engine in process %d)", self.model_name, proc.pid)
        while True:
            msg = self._recv(sock, proc)
            if msg is None:
                break
            outs = decode_outputs(msg[1])
            if outs.stats is not None:
                self.stats = outs.stats
            self._on_outputs(outs)
        if self._stopping:
            self._fail_all(EngineDeadError("engine shut down"))
            return
        self.state = "dead"
        self.error = f"the engine process exited (exit code {proc.exitcode})"
        logger.error("%s", self.error)
        self._fail_all(EngineDeadError(self.error))

    @staticmethod
    def _recv(sock: zmq.Socket, proc: mp.process.BaseProcess) -> list[bytes] | None:
        """The child's next message; None once it has exited."""
        while True:
            if sock.poll(500):
                return sock.recv_multipart(copy=True)
            if not proc.is_alive():
                # Its last words may still be on the way.
                return sock.recv_multipart(copy=True) if sock.poll(100) else None


def _child_main(
    config: EngineConfig,
    inbox_addr: str,
    outbox_addr: str,
    log_level: int,
    builder: Callable[[EngineConfig], tuple[Any, str]] | None = None,
) -> None:
    """The engine process: build the engine, then drain, step and report until told to stop."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    parent = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(inbox_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(outbox_addr)
    if builder is None:
        from osserve.engine.factory import build_engine as builder
    try:
        core, name = builder(config)
    except Exception as e:  # noqa: BLE001 - any load failure is reported to the server, with the reason
        logger.debug("engine failed to load", exc_info=True)
        outbox.send_multipart([b"dead", _ENCODER.encode(f"{type(e).__name__}: {e}")])
        outbox.close()
        return
    stats = core.stats()
    outbox.send_multipart([b"ready", _ENCODER.encode([name, core.vocab_size, core.max_seq_len, stats])])
    report = ProgressLog(stats)
    try:
        _serve(core, inbox, outbox, report, parent)
    finally:
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        inbox.close(0)
        outbox.close()


def _serve(core: Any, inbox: zmq.Socket, outbox: zmq.Socket, report: ProgressLog, parent: int) -> None:
    decode = msgspec.msgpack.decode
    while True:
        idle = not core.has_unfinished()
        t0 = time.perf_counter()
        received = False
        if inbox.poll(500 if idle else 0):
            while True:
                try:
                    item = decode(inbox.recv(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                received = True
                op = item[0]
                if op == "stop":
                    return
                if op == "add":
                    _, rid, handle, ids, wire = item
                    try:
                        core.add_request(rid, ids, SamplingParams.from_wire(wire), handle)
                    except ValueError as e:
                        core.refuse(handle, str(e))
                elif op == "abort":
                    core.abort(item[1])
        if os.getppid() != parent:  # the server is gone
            return
        if idle:
            report.idle += time.perf_counter() - t0
            if not received:
                continue
        outs = core.step()
        outs.stats = stats = core.stats()
        outbox.send_multipart([b"out", encode_outputs(outs)], copy=False)
        report.maybe_log(stats)
