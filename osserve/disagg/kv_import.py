"""The decode half of a handoff: continue here a request whose prompt and first token were computed elsewhere.

`KVImporter.continue_request` reserves blocks for the prompt, fetches its KV into them from the prefill
worker that holds it, with the first transport both sides serve (best first: `nixl` when this worker's KV
pool is registered with NIXL and the source's is too, then `zmq` unless kv_transport is `nixl`), lets the
source free its copy, and adopts the request into the engine, which decodes on from the first token. A
fetch that fails or passes the deadline (`kv_transfer_timeout`) is counted by reason and the prompt is
recomputed here instead; so is a request with no KV source (its prefill worker died) or with more than one
token already sent (a decode worker died mid-stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import zmq.asyncio

from osserve.disagg.kv_nixl import NixlKVTransport, NixlPool
from osserve.disagg.kv_transfer import KVTransferError, KVTransport, TransferStats, ZmqKVTransport
from osserve.disagg.messages import KVSource
from osserve.engine.async_engine import AsyncEngine
from osserve.engine.engine import EngineCore
from osserve.engine.handoff import HandoffState, KVHandoff, ReservedBlocks
from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import SamplingParams

logger = logging.getLogger("osserve.disagg.worker")

# How long a continued request waits for KV room before its frontend is told to try elsewhere.
RESERVE_TIMEOUT_S = 30.0


class KVImporter:
    """A decode worker's KV transports, and what they moved (TransferStats)."""

    def __init__(
        self,
        engine: AsyncEngine,
        handoff: KVHandoff,
        ctx: zmq.asyncio.Context,
        kind: str,
        timeout_s: float,
        pool: NixlPool | None,
        lookup: Callable[[str], Awaitable[dict[str, Any] | None]],
        debug_delay: float = 0.0,
    ):
        self.engine = engine
        self.handoff = handoff
        # Test hook (fault injection): seconds between reserving blocks and fetching, so that tests can act
        # mid-transfer.
        self.debug_delay = debug_delay
        self.transports: list[KVTransport] = []
        if pool is not None:
            self.transports.append(NixlKVTransport(engine, handoff, ctx, timeout_s, pool, lookup))
        if kind != "nixl":
            self.transports.append(ZmqKVTransport(engine, handoff, ctx, timeout_s))
        self.stats = TransferStats()
        self.num_pulled = 0
        self.num_recomputed = 0

    def counters(self) -> dict[str, int]:
        return {"kv_pulled": self.num_pulled, "kv_recomputed": self.num_recomputed}

    async def continue_request(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        state: HandoffState,
        source: KVSource | None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine stream of the continued request (its KV fetched, or recomputed)."""
        engine, handoff = self.engine, self.handoff
        if source is not None and len(state.output_token_ids) == 1:
            transport = next((t for t in self.transports if t.can_fetch(source)), None)
            try:
                if transport is None:
                    raise KVTransferError(
                        f"no KV transport both sides serve (here: {[t.name for t in self.transports]}, "
                        f"{source.worker_id}: {source.transports})",
                        "unsupported",
                    )
                await self._fetch(transport, rid, prompt, params, source)
                self.num_pulled += 1
                return engine.adopt(
                    rid,
                    lambda core, handle: handoff.start_continued(rid, state, handle),
                    params,
                    prompt,
                    state.restore(),
                )
            except KVTransferError as e:
                self.stats.fallback(e.reason)
                logger.warning(
                    "request %s: KV fetch from %s failed (%s: %s); recomputing the prompt here",
                    rid,
                    source.worker_id,
                    e.reason,
                    e,
                )
                if transport is not None:
                    transport.release(source)
        self.num_recomputed += 1
        return engine.adopt(
            rid,
            lambda core, handle: handoff.start_resumed(rid, prompt, params, state, handle),
            params,
            prompt,
            state.restore(),
        )

    async def _fetch(
        self,
        transport: KVTransport,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        source: KVSource,
    ) -> None:
        """Reserve blocks and fetch the prompt's KV into them, then let the source free its copy. On any
        failure (cancellation too) the reserved blocks are released: at once, or, while a transport may
        still be writing them, when it has stopped."""
        engine, handoff = self.engine, self.handoff
        fetching = False  # from then on the transport ends the pin of its reserved blocks
        try:
            reserved = await self._reserve(rid, prompt, params, transport.pins_blocks)
            if self.debug_delay:
                await asyncio.sleep(self.debug_delay)
            start = time.monotonic()
            fetching = True
            result = await transport.fetch(source, rid, reserved)
        except BaseException:

            def undo(core: EngineCore) -> None:
                if not fetching:
                    handoff.end_import(rid)
                handoff.release(rid)

            await engine.call(undo, 30.0)
            raise
        self.stats.add(transport.name, result, time.monotonic() - start)
        transport.release(source)

    async def _reserve(
        self, rid: str, prompt: list[int], params: SamplingParams, pin: bool
    ) -> ReservedBlocks:
        engine, handoff = self.engine, self.handoff
        deadline = time.monotonic() + RESERVE_TIMEOUT_S
        while True:
            reserved = await engine.call(lambda core: handoff.reserve(rid, prompt, params, pin), 30.0)
            if reserved is not None:
                return reserved
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no room for the KV of {len(prompt)} prompt tokens in {RESERVE_TIMEOUT_S:.0f}s"
                )
            await asyncio.sleep(0.02)

    def close(self) -> None:
        for t in self.transports:
            t.close()
