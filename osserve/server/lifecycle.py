"""How a server process runs its app (`osserve serve`, `osserve frontend`): uvicorn, a graceful drain on
SIGTERM / SIGINT, and an exit status that says what happened.

- First SIGTERM or SIGINT: `ServerState.drain`. The server keeps listening, but new requests get 503 with
  Retry-After and /health answers 503 "draining"; requests in flight get `shutdown_timeout` seconds to
  finish; those still running then end with an error (streams: an error event, then [DONE]); then uvicorn
  closes the connections and the engine shuts down. A second signal ends the requests in flight at once.
- `ServerState.fail(reason)` (from any thread): drain, then exit with status 1.
- `exit_on_engine_death`: an engine that cannot load its model, or dies later, makes the process exit with
  status 1 after one line saying why, rather than answering 503 forever; whatever supervises the process
  restarts it. (The disaggregated frontend leaves it off: its workers come and go.)
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from osserve.server.serving import ServerState

logger = logging.getLogger("osserve.server")

# Seconds uvicorn still waits for connections once the drain is over (they have ended by then).
_CLOSE_TIMEOUT_S = 3.0


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, exit_on_engine_death: bool):
        super().__init__(config)
        self.state = state
        self.exit_on_engine_death = exit_on_engine_death
        self.exit_code = 0
        self.signals = 0
        self.was_ready = False
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: runs in a signal handler: only flags here; on_tick (on the event loop) acts on them.
        self.signals += 1
        if self.signals >= 3:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.fatal is not None and self._drain is None:
            logger.error("%s; draining, then exiting with status 1", self.state.fatal)
            self.exit_code = 1
            self._drain = asyncio.ensure_future(self.state.drain())
        if self.signals and self._drain is None:
            self._drain = asyncio.ensure_future(self.state.drain())
        if self.signals >= 2:
            self.state.stopping.set()
        if self._drain is not None and self._drain.done():
            return True
        engine = self.state.engine
        self.was_ready |= engine.state == "ready"
        if self.exit_on_engine_death and engine.state == "dead" and self._drain is None:
            if self.was_ready:
                logger.error("the engine died (%s); exiting with status 1", engine.error)
            else:  # the app logged why the model did not load
                logger.info("exiting with status 1")
            self.exit_code = 1
            return True
        return await super().on_tick(counter)


def serve_app(app: FastAPI, host: str, port: int, log_level: str, exit_on_engine_death: bool) -> int:
    """Run `app` until it is drained (signal) or its engine died; returns the process's exit status."""
    state: ServerState = app.state.server
    state.url = f"http://{host}:{port}"
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level == "debug",
        log_config=None,
        timeout_graceful_shutdown=_CLOSE_TIMEOUT_S,
    )
    server = _Server(config, state, exit_on_engine_death)
    server.run()
    return server.exit_code
