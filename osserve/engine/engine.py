"""EngineCore: step-by-step serving of many requests, in token ids only.

`add_request` takes a request's samples under integer handles chosen by the client; `step()` schedules and
launches one step and returns the results of the step before it (overlap scheduling) as one packed
EngineCoreOutputs: per sample that sampled, its handle, its token and whether that ended it. Text, stop
strings, logprob formatting and the grouping of samples into requests are the client's work
(osserve/engine/output_processor.py), in the server process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from osserve.config import EngineConfig
from osserve.engine.input_batch import InputBatch
from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.outputs import EngineCoreOutputs, Finish, concat_outputs
from osserve.engine.request import Request, RequestStatus
from osserve.engine.runner import ModelRunner, StepHandle, StepResult
from osserve.engine.scheduler import Scheduler
from osserve.sampling_params import SamplingParams
from osserve.structured import GrammarMatcher

logger = logging.getLogger(__name__)


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...
    def add_many(self, token_ids: list[int]) -> str: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def detokenizer(self, skip_special_tokens: bool = True) -> Detokenizer: ...


class EngineCore:
    """Owns the scheduler, the KV cache manager, the persistent batch and the runner."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        kv: KVCacheManager,
        max_seq_len: int,
        eos_token_ids: Sequence[int],
    ):
        self.config = config
        self.runner = runner
        self.kv = kv
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)
        max_blocks = -(-max_seq_len // kv.block_size) + 1
        self.batch = InputBatch(config.max_batch_size, max_blocks, runner.device, kv)
        self.scheduler = Scheduler(config, kv, self.batch, max_seq_len, self.eos_token_ids)
        # Unfinished samples by handle.
        self.requests: dict[int, Request] = {}
        self.vocab_size = runner.vocab_size
        self.num_steps = 0
        self.num_generated = 0  # tokens sampled
        self.step_s = 0.0  # seconds in step(), waits for the device included
        # The launched step whose results are not read yet (overlap scheduling).
        self.inflight: StepHandle | None = None
        # Outputs produced between steps (samples aborted by the engine, refused requests), sent with the
        # next step's.
        self._errors: list[tuple[int, str]] = []

    # -- requests --------------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise ValueError (naming the field) if the request can never be served; return max_tokens."""
        max_tokens = params.check_request(
            len(prompt_token_ids), self.vocab_size, self.max_seq_len, prompt_token_ids
        )
        if not self.config.enable_chunked_prefill and len(prompt_token_ids) > self.config.max_num_tokens:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, beyond max_num_tokens ({self.config.max_num_tokens}) "
                "and enable_chunked_prefill is off"
            )
        need = self.kv.max_blocks_for(len(prompt_token_ids) + max_tokens, self.config.max_num_tokens)
        if need > self.kv.pool.num_usable:
            raise ValueError(
                f"prompt plus max_tokens needs {need} KV blocks, the whole cache holds {self.kv.pool.num_usable}; "
                "lower max_tokens or give the KV cache more memory"
            )
        return max_tokens

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: int
    ) -> list[Request]:
        """Queue a request's `params.n` samples under handles `handle` .. `handle + n - 1`; raises ValueError
        (naming the field) if it can never be served."""
        if any(handle + i in self.requests for i in range(params.n)):
            raise ValueError(f"request {request_id!r}: handle {handle} is already in use")
        max_tokens = self.check_request(prompt_token_ids, params)
        # Compiled once; the other samples of an n > 1 request copy its fresh state.
        grammar = GrammarMatcher(params.structured) if params.structured is not None else None
        samples = [
            Request(
                request_id=request_id if params.n == 1 else f"{request_id}-{i}",
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                parent_id=request_id if params.n > 1 else None,
                sample_index=i,
                handle=handle + i,
                grammar=grammar.copy() if grammar is not None and i else grammar,
            )
            for i in range(params.n)
        ]
        for req in samples:
            if req.request_id in self.scheduler.requests:
                raise ValueError(f"request id {req.request_id!r} is already in use")
        for req in samples:
            self.scheduler.add(req)
            self.requests[req.handle] = req
        return samples

    def refuse(self, handle: int, message: str) -> None:
        """Report a request the engine could not take (e.g. refused on the way in) with the next outputs."""
        self._errors.append((handle, message))

    def abort(self, handles: Sequence[int]) -> None:
        """Abort samples; their blocks are free when this returns."""
        for h in handles:
            req = self.requests.pop(h, None)
            if req is not None:
                self.scheduler.abort(req.request_id)

    def has_unfinished(self) -> bool:
        # NOTE: a step still in flight when every request has finished holds only wasted work (tokens
        # past a stop); the next step() reads and drops it.
        return bool(self.requests) or bool(self._errors)

    # -- the step --------------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """Schedule and launch one step; return the outputs of the step before it (overlap scheduling)
        or of this one (synchronous)."""
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:
            self.step_s += time.perf_counter() - t0

    def _step(self) -> EngineCoreOutputs:
        # Penalties and logits processors read the generated tokens on the host: no step may be in flight
        # when such a request is scheduled.
        overlap = not self.config.disable_overlap_scheduler and self.batch.num_sync == 0
        # Grammars must see the previous step's tokens before this step samples: the forward is queued first
        # (the device runs it while the host reads the previous step back), the sampling after.
        defer = overlap and self.batch.num_grammar > 0
        parts: list[EngineCoreOutputs] = []
        if self.inflight is not None and not overlap:
            parts.append(self._finish(self.inflight))
            self.inflight = None
        sched = self.scheduler.schedule()
        handle = None
        if not sched.is_empty:
            self.num_steps += 1
            handle = self.runner.launch(sched, self.batch, defer_sampling=defer, after=self.inflight)
            self.batch.num_computed[sched.rows] += sched.num_new
            self.batch.num_pending[handle.sample_rows] += 1
        # While the device runs the new step, read back and process the previous one.
        if self.inflight is not None:
            parts.append(self._finish(self.inflight))
        if handle is not None:
            self.runner.sample(handle, self.batch)
        self.inflight = handle
        if handle is not None and not overlap:
            parts.append(self._finish(handle))
            self.inflight = None
        out = concat_outputs(parts) if parts else EngineCoreOutputs.empty()
        if self.scheduler.admitted:
            out.num_cached = out.num_cached + self.scheduler.admitted
            self.scheduler.admitted = []
        if self._errors:
            out.errors = out.errors + self._errors
            self._errors = []
        return out

    def _finish(self, handle: StepHandle) -> EngineCoreOutputs:
        """Read a step back: append the sampled tokens, decide which samples it ended, free those."""
        res = self.runner.collect(handle)
        b = self.batch
        rows = res.rows
        # A row whose sample finished (or was preempted) after this step was launched no longer holds it.
        held = b.handle[rows] == res.handles
        moved = None
        if held.all():
            live_rows, tokens, idx = rows, res.tokens, None
        else:
            idx = np.flatnonzero(held)
            live_rows, tokens = rows[idx], res.tokens[idx]
            moved = self._unheld(res, np.flatnonzero(~held))
        n = len(live_rows)
        self.num_generated += n
        for req, t in zip(b.reqs[live_rows], tokens.tolist(), strict=True):
            req.output_token_ids.append(t)
        b.num_pending[live_rows] -= 1
        b.num_tokens[live_rows] += 1
        b.last_token[live_rows] = tokens
        finish = self._finish_codes(live_rows, tokens)
        if b.num_grammar:
            self._advance_grammars(live_rows, tokens, finish)
        out = EngineCoreOutputs(b.handle[live_rows], tokens.astype(np.int32), finish)
        if res.lp_ids is not None:
            lp_ids, lp_values, lp_ranks = (
                (res.lp_ids, res.lp_values, res.lp_ranks)
                if idx is None
                else (res.lp_ids[idx], res.lp_values[idx], res.lp_ranks[idx])  # type: ignore[index]
            )
            want = np.flatnonzero(b.logprobs[live_rows] >= 0)
            out.lp_index = want.astype(np.int32)
            out.lp_ids, out.lp_values, out.lp_ranks = lp_ids[want], lp_values[want], lp_ranks[want]
        if res.prompt_logprobs:
            out.prompt_logprobs = [p for p in res.prompt_logprobs if p.handle in self.requests]
        sched = handle.sched
        self._kv_events(sched.rows if sched.kv_due is None else sched.rows[sched.kv_due])
        for i in np.flatnonzero(finish).tolist():
            req = b.reqs[live_rows[i]]
            code = Finish(int(finish[i]))
            status = (
                RequestStatus.FINISHED_LENGTH if code == Finish.LENGTH else RequestStatus.FINISHED_STOPPED
            )
            self.requests.pop(req.handle, None)
            self.scheduler.finish(req, status)
        return out if moved is None or not len(moved) else concat_outputs([out, moved])

    def _finish_codes(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Finish per sampled row: a stop token (past min_tokens), else the length limit."""
        b = self.batch
        hit = b.stop_ids[rows] == tokens[:, None]
        can_stop = b.num_tokens[rows] - b.num_prompt[rows] >= b.min_tokens[rows]
        is_token = (hit & b.stop_is_token[rows]).any(axis=1) & can_stop
        is_eos = (hit & ~b.stop_is_token[rows]).any(axis=1) & can_stop
        length = b.num_tokens[rows] >= b.length_cap[rows]
        return np.where(
            is_token, Finish.STOP_TOKEN, np.where(is_eos, Finish.EOS, np.where(length, Finish.LENGTH, 0))
        ).astype(np.int8)

    def _advance_grammars(self, rows: np.ndarray, tokens: np.ndarray, finish: np.ndarray) -> None:
        """Move each grammar past its sampled token; a grammar that reached its end (or broke) ends the
        sample (finish "stop", the token as stop_reason)."""
        b = self.batch
        for i in np.flatnonzero(b.has_grammar[rows]).tolist():
            req = b.reqs[rows[i]]
            if self._advance_grammar(req, int(tokens[i])) and not finish[i]:
                finish[i] = Finish.STOP_TOKEN

    @staticmethod
    def _advance_grammar(req: Request, token: int) -> bool:
        """True once the request's grammar is done."""
        g = req.grammar
        assert g is not None
        if not g.accept(token):
            logger.warning(
                "request %s: token %d broke its %s grammar: %s", req.request_id, token, g.kind, g.error
            )
        return g.done

    def _unheld(self, res: StepResult, idx: np.ndarray) -> EngineCoreOutputs:
        """Tokens of samples that left their row after the step was launched: a preempted sample keeps its
        token (it is valid; the recompute continues after it); a finished or aborted one drops it."""
        handles, tokens, finish, lp_rows = [], [], [], []
        for i in idx.tolist():
            req = self.requests.get(int(res.handles[i]))
            if req is None or req.status.is_finished or req.row >= 0:
                continue
            t = int(res.tokens[i])
            req.output_token_ids.append(t)
            req.num_pending -= 1
            self.num_generated += 1
            code = self._finish_code(req, t)
            if req.grammar is not None and self._advance_grammar(req, t) and not code:
                code = Finish.STOP_TOKEN
            if req.sampling_params.logprobs is not None and res.lp_ids is not None:
                lp_rows.append((len(handles), i))
            handles.append(req.handle)
            tokens.append(t)
            finish.append(code)
            if code:
                self.requests.pop(req.handle, None)
                status = (
                    RequestStatus.FINISHED_LENGTH if code == Finish.LENGTH else RequestStatus.FINISHED_STOPPED
                )
                self.scheduler.finish(req, status)
        out = EngineCoreOutputs(
            np.asarray(handles, np.int64), np.asarray(tokens, np.int32), np.asarray(finish, np.int8)
        )
        if lp_rows:
            assert res.lp_ids is not None and res.lp_values is not None and res.lp_ranks is not None
            entry, src = (np.asarray(x, np.int64) for x in zip(*lp_rows, strict=True))
            out.lp_index = entry.astype(np.int32)
            out.lp_ids, out.lp_values, out.lp_ranks = res.lp_ids[src], res.lp_values[src], res.lp_ranks[src]
        return out

    def _finish_code(self, req: Request, token: int) -> Finish:
        """_finish_codes for one request outside the batch."""
        p = req.sampling_params
        if len(req.output_token_ids) >= p.min_tokens:
            if token in p.stop_token_ids:
                return Finish.STOP_TOKEN
            if token in req.eos_token_ids and not p.ignore_eos:
                return Finish.EOS
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_seq_len:
            return Finish.LENGTH
        return Finish.NONE

    def _kv_events(self, rows: np.ndarray) -> None:
        """Register newly filled blocks in the prefix cache and release blocks the sliding window left
        behind, for the rows of a finished step that had KV events (a prefill chunk, a new block). A decoding
        request does this once per block (with the allocation), not at every boundary of its own."""
        b, kv = self.batch, self.kv
        rows = rows[b.handle[rows] >= 0]
        bs = kv.block_size
        nc = b.num_computed[rows]
        due = np.minimum(nc, b.num_tokens[rows]) // bs > b.num_registered[rows]
        if kv.window is not None:
            due |= np.maximum(0, nc - kv.window + 1) // bs > b.num_released[rows]
        for r in rows[due].tolist():
            req = b.reqs[r]
            kv.on_computed(req)
            b.sync_blocks(req)

    # -- state -----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv": self.kv.usage(),
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated,
            "step_seconds": self.step_s,
            "device_wait_seconds": getattr(self.runner, "device_wait_s", 0.0),
            "num_preemptions": self.scheduler.num_preemptions,
        }
