"""Streaming and waiting on the client: Server-Sent Events that end with an error event when anything fails
or the server stops, and non-streaming work that is cancelled when the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from osserve.server.openai_errors import PROPAGATE, APIError, internal_error

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class Stopped(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T], stop: asyncio.Event | None = None) -> T:
    """Run `work`; if the client goes away first, cancel it and raise ClientDisconnected (if `stop` is set
    first: Stopped)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    stopper = asyncio.ensure_future(stop.wait() if stop is not None else asyncio.Event().wait())
    try:
        done, _ = await asyncio.wait({task, watch, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected if watch in done else Stopped
    finally:
        for t in (task, watch, stopper):
            t.cancel()
        await asyncio.gather(task, watch, stopper, return_exceptions=True)


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def done_event() -> str:
    return sse("[DONE]")


class EventStream(StreamingResponse):
    """Server-Sent Events over `body`. An error while streaming (an APIError, or anything else, native
    panics included) and `stop` (the end of the server's shutdown grace period: `stop_error`) end the
    stream with `on_error`'s events (an error event, then `[DONE]` where the API has one). Whatever ends the
    response (last event, client disconnect, an error), `on_close` runs, so an abandoned request is aborted
    and its KV blocks are freed at once."""

    def __init__(
        self,
        body: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        on_error: Callable[[APIError], list[str]],
        stop: asyncio.Event,
        stop_error: Callable[[], APIError],
    ):
        # X-Accel-Buffering: proxies such as nginx must pass events on as they come.
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._on_error = on_error
        self._stop = stop
        self._stop_error = stop_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended: APIError | None = None
        complete = gone = False

        async def event(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})

        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    nonlocal ended, complete, gone
                    try:
                        async for text in self.body_iterator:
                            await event(text)  # type: ignore[arg-type]
                        complete = True
                    except OSError:
                        gone = True  # the client went away mid-send
                    except APIError as e:
                        ended = e
                    except PROPAGATE:
                        raise
                    except BaseException as e:  # noqa: BLE001 - a panic in a native library
                        ended = internal_error(e, "streaming the response")
                    tg.cancel_scope.cancel()

                async def watch_client() -> None:
                    nonlocal gone
                    await self.listen_for_disconnect(receive)
                    gone = True
                    tg.cancel_scope.cancel()

                async def watch_shutdown() -> None:
                    nonlocal ended
                    await self._stop.wait()
                    if not complete and ended is None:
                        ended = self._stop_error()
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch_client)
                tg.start_soon(watch_shutdown)
            if not gone:
                for text in self._on_error(ended) if ended is not None else []:
                    await event(text)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._on_close()


def chat_error_events(error: APIError) -> list[str]:
    """How Chat Completions and Completions streams end on an error: the error object, then [DONE]."""
    return [sse(error.body()), done_event()]
