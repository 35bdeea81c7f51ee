"""KV handoff between two engines (disaggregated prefill / decode serving): the engine-side half.

Prefill side. A request marked with `mark_prefill_only` runs as usual until it has its first token. Right
after that step (`after_step`, installed as AsyncEngine.after_step) it leaves the scheduler but keeps its
KV blocks: it is "held" until the decode side has copied them (`release`) or until `expire` gives up on it.
`export` reads a held request's blocks out of the runner's KV tensors: every full-attention block of the
prompt, and the sliding-window blocks still inside the window (the older ones are already released).

Decode side. `reserve` allocates blocks for an incoming prompt, `write` copies the received KV into them
(or a transport writes them itself, off the engine thread, and `end_import` says when it is done), and
`start_continued` puts the request into the scheduler as if this engine had computed the prompt itself
(num_computed_tokens = prompt length, first token already sampled), so its next step decodes.
`start_resumed` takes a request with output tokens but no KV (the worker that produced them died) and lets
the scheduler recompute it, exactly as after a preemption.

Every method runs on the engine thread between two steps (AsyncEngine.call / adopt / after_step). The
text side (what the client was already sent) lives with the AsyncEngine's OutputProcessor, which fills in
`num_sent_chars` and `cumulative_logprob` of the HandoffState a prefill-only request ends with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from osserve.engine.engine import EngineCore
from osserve.engine.kv_cache import FULL, NULL_BLOCK, SLIDING, RequestBlocks
from osserve.engine.outputs import EngineCoreOutputs, Finish
from osserve.engine.request import Request, RequestStatus
from osserve.sampling_params import OutputKind, SamplingParams
from osserve.structured import GrammarMatcher


@dataclass(frozen=True)
class KVLayout:
    """What two engines must agree on for KV blocks to move between them."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layer_types: tuple[str, ...]
    sliding_window: int | None

    @classmethod
    def of(cls, core: EngineCore) -> KVLayout:
        attn = core.runner.model.layers[0].self_attn
        mcfg = core.runner.model_config
        return cls(
            block_size=core.kv.block_size,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            dtype=str(core.runner.model.dtype).removeprefix("torch."),
            layer_types=tuple(mcfg.layer_types),
            sliding_window=core.kv.window,
        )


@dataclass
class HandoffState:
    """Everything besides the KV that the decode side needs to continue a request exactly."""

    # Output tokens so far (the prefill side's first token, or more when a dead decode is replayed).
    output_token_ids: list[int]
    # Characters of the output text the client has already been sent (the rest was held back, e.g. as a
    # possible start of a stop string).
    num_sent_chars: int = 0
    cumulative_logprob: float = 0.0
    # The request's torch.Generator state (seeded sampling), so that the next draw continues its stream.
    rng_state: bytes | None = None

    def restore(self) -> tuple[list[int], int, float]:
        """What the engine's client side continues from (AsyncEngine.adopt's `restore`): the tokens, the
        characters of their text already sent, the cumulative logprob."""
        return list(self.output_token_ids), self.num_sent_chars, self.cumulative_logprob


@dataclass
class ExportedKV:
    """A held request's KV: [num_layers_of_group, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]."""

    num_tokens: int
    full: torch.Tensor | None
    sliding: torch.Tensor | None
    # Physical block ids on the exporting engine (for transports that copy device to device).
    full_block_ids: list[int] = field(default_factory=list)
    sliding_block_ids: list[int] = field(default_factory=list)


@dataclass
class ReservedBlocks:
    """The blocks `reserve` allocated for a prompt, in the order the source exports them."""

    full: list[int]
    # Only the sliding-window blocks still in the window (the older entries of the table are the null block).
    sliding: list[int]


@dataclass
class _Held:
    req: Request
    since: float


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVHandoff:
    """Requests of one engine whose KV blocks live outside its scheduler: held for export (prefill side) or
    reserved for import (decode side)."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.layout = KVLayout.of(core)
        mcfg = core.runner.model_config
        self.full_layers = list(mcfg.full_layers)
        self.sliding_layers = list(mcfg.sliding_layers)
        self.prefill_only: dict[int, Request] = {}  # by handle
        self.held: dict[str, _Held] = {}
        self.reserved: dict[str, Request] = {}
        # Reserved requests whose blocks a transfer may be writing into outside the engine thread (pinned):
        # a release waits for `end_import`, so the blocks cannot go to another request mid-write.
        self.importing: set[str] = set()
        self._release_after_import: set[str] = set()

    # -- prefill side ----------------------------------------------------------------------------------
    def add_prefill_only(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: int
    ) -> None:
        """Queue a request that stops after its first token and keeps its blocks (raises ValueError)."""
        if params.n != 1:
            raise ValueError("a prefill-only request has n = 1 (the frontend splits n > 1 into requests)")
        if params.output_kind == OutputKind.FINAL_ONLY:
            raise ValueError("a prefill-only request must stream its outputs (DELTA or CUMULATIVE)")
        (req,) = self.core.add_request(request_id, prompt_token_ids, params, handle)
        # NOTE: with overlap scheduling the next step is planned before this one's token is read back;
        # the flag keeps the scheduler from extending the KV that is about to be shipped.
        req.hold_after_first_token = True
        self.prefill_only[handle] = req

    def after_step(self, core: EngineCore, outs: EngineCoreOutputs) -> None:
        """Detach prefill-only requests that got their first token this step: their entry's finish becomes
        Finish.HANDOFF, with `outs.handoff[handle]` holding the HandoffState to continue from."""
        if not self.prefill_only or not len(outs):
            return
        for i in np.flatnonzero(np.isin(outs.handles, list(self.prefill_only))).tolist():
            req = self.prefill_only.pop(int(outs.handles[i]))
            if outs.finish[i]:  # ended on its first token (stop, length): nothing to hand off
                continue
            outs.finish[i] = Finish.HANDOFF
            outs.handoff = {**outs.handoff, req.handle: self._detach(req)}

    def _detach(self, req: Request) -> HandoffState:
        self.core.scheduler.detach(req)
        self.core.requests.pop(req.handle, None)
        req.status = RequestStatus.FINISHED_STOPPED
        self.held[req.request_id] = _Held(req, time.monotonic())
        rng = bytes(req.generator.get_state().numpy().tobytes()) if req.generator is not None else None
        return HandoffState(list(req.output_token_ids), 0, 0.0, rng)

    def export(self, request_id: str, gather: bool = True) -> ExportedKV:
        """The held request's KV, on the engine's device (raises KeyError if it is not held). `gather`
        False: only the block ids (for a transport that reads the pool itself)."""
        held = self.held[request_id]
        # A pull began: the hold timeout counts from here, so that it cannot free blocks under a reader.
        held.since = time.monotonic()
        req = held.req
        rb = self.core.kv.blocks_of(request_id)
        n = _ceil_div(req.num_computed_tokens, self.layout.block_size)
        full_ids = rb.full[:n]
        sliding_ids = [b for b in rb.sliding[:n] if b != NULL_BLOCK]
        return ExportedKV(
            num_tokens=req.num_computed_tokens,
            full=self._gather(self.full_layers, full_ids) if full_ids and gather else None,
            sliding=self._gather(self.sliding_layers, sliding_ids) if sliding_ids and gather else None,
            full_block_ids=list(full_ids),
            sliding_block_ids=sliding_ids,
        )

    def _gather(self, layers: list[int], block_ids: list[int]) -> torch.Tensor:
        caches = self.core.runner.kv_caches
        idx = torch.tensor(block_ids, dtype=torch.long, device=caches[layers[0]][0].device)
        return torch.stack([torch.stack((caches[i][0][idx], caches[i][1][idx])) for i in layers])

    def release(self, request_id: str) -> bool:
        """Free a held or reserved request's blocks; False if it has none (already released). A pinned
        reservation is freed at its `end_import`."""
        if request_id in self.importing:
            self._release_after_import.add(request_id)
            return True
        for h, r in list(self.prefill_only.items()):
            if r.request_id == request_id:
                del self.prefill_only[h]
        held = self.held.pop(request_id, None)
        req = held.req if held is not None else self.reserved.pop(request_id, None)
        if req is None:
            return False
        self.core.kv.free(req)
        return True

    def expire(self, max_age_s: float) -> list[str]:
        """Release held requests nobody fetched within `max_age_s` (a decode worker that died, say)."""
        now = time.monotonic()
        old = [rid for rid, h in self.held.items() if now - h.since > max_age_s]
        for rid in old:
            self.release(rid)
        return old

    # -- decode side -----------------------------------------------------------------------------------
    def _check(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> int:
        core = self.core
        if request_id in core.scheduler.requests or request_id in self.reserved or request_id in self.held:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n != 1:
            raise ValueError("a continued request has n = 1")
        max_tokens = params.check_request(
            len(prompt_token_ids), core.vocab_size, core.max_seq_len, prompt_token_ids
        )
        need = core.kv.max_blocks_for(len(prompt_token_ids) + max_tokens, core.config.max_num_tokens)
        if need > core.kv.pool.num_usable:
            raise ValueError(
                f"prompt plus max_tokens needs {need} KV blocks, the whole cache holds "
                f"{core.kv.pool.num_usable}"
            )
        return max_tokens

    def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, pin: bool = False
    ) -> ReservedBlocks | None:
        """Allocate blocks for the prompt's KV; None (nothing changed) when there is no room right now.
        `pin`: a transport will write them off the engine thread; they stay until `end_import`."""
        max_tokens = self._check(request_id, prompt_token_ids, params)
        core, kv = self.core, self.core.kv
        num_prompt = len(prompt_token_ids)
        n = _ceil_div(num_prompt, kv.block_size)
        first = kv._first_needed(num_prompt) if kv.has_sliding else 0
        need = (n if kv.has_full else 0) + (n - first if kv.has_sliding else 0)
        if (
            core.scheduler.num_running + len(self.reserved) >= core.config.max_batch_size
            or need > kv.pool.num_free
        ):
            return None
        rb = RequestBlocks()
        if kv.has_full:
            rb.full = kv.pool.allocate(n)
        if kv.has_sliding:
            rb.sliding = [NULL_BLOCK] * first + kv.pool.allocate(n - first)
        kv.reqs[request_id] = rb
        self.reserved[request_id] = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_ids=core.eos_token_ids,
        )
        if pin:
            self.importing.add(request_id)
        return ReservedBlocks(list(rb.full), [b for b in rb.sliding if b != NULL_BLOCK])

    def end_import(self, request_id: str) -> None:
        """A transport has stopped writing into a pinned reservation: free it if it was released meanwhile."""
        self.importing.discard(request_id)
        if request_id in self._release_after_import:
            self._release_after_import.discard(request_id)
            self.release(request_id)

    def write(self, request_id: str, full: torch.Tensor | None, sliding: torch.Tensor | None) -> None:
        """Copy received KV (ExportedKV layout, any device) into the reserved blocks."""
        if request_id not in self.reserved:
            raise KeyError(request_id)
        rb = self.core.kv.blocks_of(request_id)
        self._scatter(self.full_layers, rb.full, full, "full")
        self._scatter(self.sliding_layers, [b for b in rb.sliding if b != NULL_BLOCK], sliding, "sliding")

    def _scatter(self, layers: list[int], block_ids: list[int], data: torch.Tensor | None, what: str) -> None:
        if not block_ids:
            return
        bs, h, d = self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim
        expected = (len(layers), 2, len(block_ids), bs, h, d)
        if data is None or tuple(data.shape) != expected:
            got = None if data is None else tuple(data.shape)
            raise ValueError(f"received {what}-attention KV of shape {got}, expected {expected}")
        caches = self.core.runner.kv_caches
        dev = caches[layers[0]][0].device
        idx = torch.tensor(block_ids, dtype=torch.long, device=dev)
        data = data.to(dev)
        for j, i in enumerate(layers):
            k, v = caches[i]
            k.index_copy_(0, idx, data[j, 0].to(k.dtype))
            v.index_copy_(0, idx, data[j, 1].to(v.dtype))

    def start_continued(self, request_id: str, state: HandoffState, handle: int) -> None:
        """Schedule a reserved request whose prompt KV has been written: it decodes from its first token."""
        if request_id in self.importing:
            raise ValueError(f"request {request_id!r}: its KV transfer has not ended")
        req = self.reserved.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id!r} has no reserved blocks here (cancelled?)")
        req.handle = handle
        req.num_computed_tokens = req.num_prompt_tokens
        self._restore(req, state)
        self.core.requests[handle] = req
        self.core.scheduler.add_running(req)
        # Registers the imported full blocks in this engine's prefix cache.
        self.core.kv.on_computed(req)
        self.core.batch.sync_blocks(req)

    def start_resumed(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        state: HandoffState,
        handle: int,
    ) -> None:
        """Queue a request that has output tokens but no KV here: the scheduler recomputes prompt + outputs
        (as after a preemption) and samples the next token."""
        max_tokens = self._check(request_id, prompt_token_ids, params)
        if len(state.output_token_ids) >= max_tokens:
            raise ValueError(f"request already has {len(state.output_token_ids)} of max_tokens {max_tokens}")
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.core.eos_token_ids,
            handle=handle,
        )
        self._restore(req, state)
        self.core.requests[handle] = req
        self.core.scheduler.add(req)

    def _restore(self, req: Request, state: HandoffState) -> None:
        p = req.sampling_params
        req.output_token_ids = list(state.output_token_ids)
        if p.structured is not None:  # the grammar picks up where the other engine's left off
            req.grammar = GrammarMatcher(p.structured)
            for t in req.output_token_ids:
                req.grammar.accept(t)
        if state.rng_state is not None and p.seed is not None:
            dev = self.core.runner.device
            gen = torch.Generator(device=dev)
            try:
                gen.set_state(torch.frombuffer(bytearray(state.rng_state), dtype=torch.uint8))
            except (RuntimeError, ValueError):  # another device type's generator: start the stream anew
                gen.manual_seed(p.seed + req.sample_index)
            req.generator = gen

    # -- publishing ------------------------------------------------------------------------------------
    def cached_block_hashes(self) -> set[int]:
        """Hashes of the prompt blocks this engine could reuse (for KV-aware routing)."""
        group = FULL if self.core.kv.has_full else SLIDING
        return {h for g, h in self.core.kv.pool.cached if g == group}

    def usage(self) -> dict[str, int]:
        return {
            "num_held": len(self.held),
            "num_reserved": len(self.reserved),
            "num_importing": len(self.importing),
            "num_prefill_only": len(self.prefill_only),
        }
