"""Token-budget scheduler: first come, first served; chunked prefill; preemption by recompute; abort.

Each step every running request gets some tokens to compute (`num_tokens - num_computed_tokens`, capped by
the step budget): a decode gets one, a prefill a chunk. Decodes are served before prefill chunks, so a long
prompt never starves running streams. When the pool runs dry the newest running request is preempted: its
blocks are released (they stay in the prefix cache) and it waits again, to be recomputed later.

The running requests' counters live in the persistent batch (InputBatch), so a step is planned on whole
columns: which rows compute how many tokens, and which of them cross into a new KV block (only those are
visited one by one). A step that cannot get its blocks falls back to the request-by-request plan that
preempts.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from osserve.config import EngineConfig
from osserve.engine.input_batch import InputBatch
from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.request import Request, RequestStatus

_EMPTY = np.zeros(0, np.int64)


@dataclass
class SchedulerOutput:
    # Batch rows (InputBatch) of the scheduled requests, in batch order, and the tokens each computes.
    rows: np.ndarray = field(default_factory=lambda: _EMPTY)
    num_new: np.ndarray = field(default_factory=lambda: _EMPTY)
    preempted: list[Request] = field(default_factory=list)
    # Rows whose KV bookkeeping may have work once the step is done (a new block, a prefill chunk): prefix
    # registration of filled blocks and sliding-window releases wait for these events (None: all rows).
    kv_due: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.num_new.sum())

    @property
    def is_empty(self) -> bool:
        return len(self.rows) == 0


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        batch: InputBatch,
        max_seq_len: int,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.config = config
        self.kv = kv
        self.batch = batch
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        # Running requests by batch row; their admission order is batch.order().
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # (handle, prompt tokens served from the prefix cache) of samples admitted since the last read.
        self.admitted: list[tuple[int, int]] = []

    # -- bookkeeping -----------------------------------------------------------------------------------
    @property
    def running(self) -> list[Request]:
        """Running requests in admission order (a new list: for inspection, not the hot path)."""
        return [self.batch.reqs[r] for r in self.batch.order()]

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Put a request whose KV is already in place (computed elsewhere) straight into the batch."""
        self.requests[req.request_id] = req
        req.status = RequestStatus.RUNNING
        self.batch.add(req, self.eos_token_ids, self.max_seq_len)

    def detach(self, req: Request) -> None:
        """Take a running request out of the scheduler without freeing its KV blocks (handoff)."""
        self.batch.remove(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now and free everything it held."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req.row >= 0:
            self.batch.remove(req)
        else:
            with contextlib.suppress(ValueError):  # not queued either (already finished)
                self.waiting.remove(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    @property
    def num_running(self) -> int:
        return self.batch.num_active

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- scheduling ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = self._plan_running()
        if out is None:
            out = self._plan_running_with_preemption()
        if not out.preempted:
            self._admit(out)
        return out

    def _plan_running(self) -> SchedulerOutput | None:
        """Plan the running requests on whole columns; None if some request cannot get its blocks."""
        b = self.batch
        rows = b.order()
        if not len(rows):
            return SchedulerOutput()
        nc, nt, pend = b.num_computed[rows], b.num_tokens[rows], b.num_pending[rows]
        # A pending token (sampled by the step in flight) is an input of this step; a request that reached
        # its length limit with it needs no more steps.
        num_new = nt + pend - nc
        ok = (num_new > 0) & (nt + pend < b.sched_cap[rows])
        prefill = nc < b.num_prompt[rows]
        dec, pre = ok & ~prefill, ok & prefill
        order = np.concatenate((rows[dec], rows[pre]))
        want = np.concatenate((num_new[dec], num_new[pre]))
        # Decodes first, then prefill chunks, each in admission order, until the budget runs out.
        budget = self.config.max_num_tokens
        take = np.clip(budget - (np.cumsum(want) - want), 0, want)
        keep = take > 0
        order, take = order[keep], take[keep]
        bs = self.kv.block_size
        grow = np.flatnonzero(-(-(b.num_computed[order] + take) // bs) > b.num_blocks[order])
        for i in grow.tolist():
            req = b.reqs[order[i]]
            if not self.kv.allocate_slots(req, int(take[i])):
                return None
            b.sync_blocks(req)
        kv_due = take > 1
        kv_due[grow] = True
        return SchedulerOutput(order, take, kv_due=kv_due)

    def _plan_running_with_preemption(self) -> SchedulerOutput:
        """Request by request: preempt the newest running requests until the older ones get their blocks."""
        b = self.batch
        out = SchedulerOutput()
        budget = self.config.max_num_tokens
        running = self.running
        order = [r for r in running if not r.is_prefilling] + [r for r in running if r.is_prefilling]
        scheduled: list[tuple[Request, int]] = []
        for req in order:
            if budget == 0:
                break
            if req.row < 0:  # preempted while serving an earlier request
                continue
            row = req.row
            num_new = min(int(b.num_tokens[row] + b.num_pending[row] - b.num_computed[row]), budget)
            if num_new <= 0 or b.num_tokens[row] + b.num_pending[row] >= b.sched_cap[row]:
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.batch.reqs[self.batch.order()[-1]]
                for i, (r, n) in enumerate(scheduled):
                    if r is victim:  # already given tokens this step: take them back
                        budget += n
                        del scheduled[i]
                        break
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                b.sync_blocks(req)
                scheduled.append((req, num_new))
                budget -= num_new
        out.rows = np.asarray([r.row for r, _ in scheduled], dtype=np.int64)
        out.num_new = np.asarray([n for _, n in scheduled], dtype=np.int64)
        return out

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.batch.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def _sibling_pending(self, req: Request) -> bool:
        """An n > 1 sample waits until its first sibling's prompt is computed and cached (its first token
        is back), to share those blocks."""
        if req.parent_id is None or req.sample_index == 0:
            return False
        first = self.requests.get(f"{req.parent_id}-0")
        return first is not None and not first.output_token_ids

    def _admit(self, out: SchedulerOutput) -> None:
        """Start waiting requests while the budget and the batch cap allow."""
        budget = self.config.max_num_tokens - out.num_tokens
        chunked = self.config.enable_chunked_prefill
        rows: list[int] = []
        counts: list[int] = []
        skipped: list[Request] = []
        b = self.batch
        while self.waiting and budget > 0 and b.num_active < self.config.max_batch_size:
            req = self.waiting[0]
            if self._sibling_pending(req) or req.num_pending:
                skipped.append(self.waiting.popleft())
                continue
            cached = self.kv.find_cached_prefix(req)
            num_new = req.num_tokens - cached[0]
            if num_new > budget:
                # Without chunked prefill a prompt runs whole, alone in the step if it must; a request
                # resumed after preemption may exceed the step budget and is then chunked anyway.
                if not chunked and budget < self.config.max_num_tokens:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, cached):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = cached[0]
                self.admitted.append((req.handle, cached[0]))
            req.status = RequestStatus.RUNNING
            rows.append(b.add(req, self.eos_token_ids, self.max_seq_len))
            counts.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        if rows:
            out.rows = np.concatenate((out.rows, np.asarray(rows, np.int64)))
            out.num_new = np.concatenate((out.num_new, np.asarray(counts, np.int64)))
            if out.kv_due is not None:
                out.kv_due = np.concatenate((out.kv_due, np.ones(len(rows), np.bool_)))
