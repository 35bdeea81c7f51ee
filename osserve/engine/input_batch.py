"""The persistent batch: the state of every running request in preallocated per-row arrays.

A request gets a row when it starts running and gives it back when it finishes or is preempted. Everything
a step reads for every sequence (tokens computed and pending, the limits, the stop tokens, the sampling
parameters, the block tables) sits in these arrays, so the scheduler, the runner and the read-back work on
whole columns at once; per-request Python runs only where a request's state changes (it starts, it gets a
block, its window releases one, it finishes). The block tables also live on the device, updated by diffs:
each step sends only the table entries that changed since the last one.
"""

from __future__ import annotations

import numpy as np
import torch

from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.request import Request
from osserve.engine.staging import to_device


class InputBatch:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device, kv: KVCacheManager):
        r, w = max_rows, max_blocks
        self.max_rows = r
        self.device = device
        self.kv = kv
        self.reqs = np.empty(r, dtype=object)  # Request per row, None when free
        self._free_rows = list(range(r - 1, -1, -1))
        self.num_active = 0
        # -1 on a free row: results of a step whose row has been given to another request since are dropped.
        self.handle = np.full(r, -1, np.int64)
        self.num_computed = np.zeros(r, np.int64)
        self.num_tokens = np.zeros(r, np.int64)  # prompt + output tokens known on the host
        self.num_pending = np.zeros(r, np.int64)  # sampled on the device, not read back yet (0 or 1)
        self.num_prompt = np.zeros(r, np.int64)
        # No more steps once num_tokens + num_pending reaches sched_cap; finish "length" at length_cap.
        self.sched_cap = np.zeros(r, np.int64)
        self.length_cap = np.zeros(r, np.int64)
        self.min_tokens = np.zeros(r, np.int64)
        # Tokens that end a sample (its stop_token_ids, and the eos tokens unless ignore_eos), -1 padded;
        # `stop_is_token` marks the stop_token_ids (their finish carries the token as stop_reason).
        self.stop_ids = np.full((r, 4), -1, np.int64)
        self.stop_is_token = np.zeros((r, 4), np.bool_)
        self.last_token = np.zeros(r, np.int64)  # the last token known on the host
        # Sampling parameters, and rows whose sampling needs per-request work (seeds, logits processors,
        # penalties): the runner visits only those one by one.
        self.temperature = np.ones(r, np.float32)
        self.top_p = np.ones(r, np.float32)
        self.top_k = np.zeros(r, np.int64)
        self.min_p = np.zeros(r, np.float32)
        self.greedy = np.zeros(r, np.bool_)
        self.logprobs = np.full(r, -1, np.int64)  # top logprobs asked for (-1: none)
        self.special = np.zeros(r, np.bool_)
        self.prompt_logprobs = np.zeros(r, np.bool_)
        # Rows whose sampling reads the host-side history (penalties, logits processors): while any runs,
        # steps are synchronous. Grammar rows only defer their step's sampling (EngineCore._step).
        self.sync = np.zeros(r, np.bool_)
        self.num_sync = 0
        self.has_grammar = np.zeros(r, np.bool_)
        self.num_grammar = 0
        # KV bookkeeping mirrors of RequestBlocks: table entries held, registered and released per row.
        self.num_blocks = np.zeros(r, np.int64)
        self.num_registered = np.zeros(r, np.int64)
        self.num_released = np.zeros(r, np.int64)
        self.full_table = np.zeros((r, w), np.int32)
        self.sliding_table = np.zeros((r, w), np.int32)
        # Table entries changed since the last flush: (row, column, full block, sliding block).
        self._diff_rows: list[int] = []
        self._diff_cols: list[int] = []
        self._diff_full: list[int] = []
        self._diff_sliding: list[int] = []
        self.full_table_dev = torch.zeros((r, w), dtype=torch.int32, device=device)
        self.sliding_table_dev = torch.zeros((r, w), dtype=torch.int32, device=device)
        # The last sampled token of each row, on the device: a decode whose input is the token the step in
        # flight samples reads it from here.
        self.last_token_dev = torch.zeros(r, dtype=torch.int64, device=device)
        self._params_dirty = True
        self.temperature_dev = self.top_p_dev = self.min_p_dev = self.top_k_dev = None
        # Admission order of the running rows, rebuilt only when the running set changes.
        self._order: list[int] = []
        self._order_array: np.ndarray | None = None

    # -- rows ------------------------------------------------------------------------------------------
    def add(self, req: Request, eos_token_ids: frozenset[int], max_seq_len: int) -> int:
        """Give `req` a row and fill it in from the request (its counters move into the row)."""
        row = self._free_rows.pop()
        p = req.sampling_params
        self.reqs[row] = req
        self.handle[row] = req.handle
        self.num_computed[row] = req._num_computed
        self.num_pending[row] = req._num_pending
        self.num_tokens[row] = req.num_tokens
        self.num_prompt[row] = req.num_prompt_tokens
        limit = min(req.num_prompt_tokens + req.max_tokens, max_seq_len)
        self.length_cap[row] = limit
        self.sched_cap[row] = min(limit, req.num_prompt_tokens + 1) if req.hold_after_first_token else limit
        self.min_tokens[row] = p.min_tokens
        stops = [(t, True) for t in p.stop_token_ids]
        if not p.ignore_eos:
            stops += [(t, False) for t in sorted(eos_token_ids) if t not in p.stop_token_ids]
        if len(stops) > self.stop_ids.shape[1]:
            self._widen_stops(len(stops))
        self.stop_ids[row] = -1
        self.stop_is_token[row] = False
        for j, (t, is_token) in enumerate(stops):
            self.stop_ids[row, j] = t
            self.stop_is_token[row, j] = is_token
        self.last_token[row] = req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1]
        self.temperature[row] = p.temperature
        self.top_p[row] = p.top_p
        self.top_k[row] = p.top_k
        self.min_p[row] = p.min_p
        self.greedy[row] = p.is_greedy
        self.logprobs[row] = -1 if p.logprobs is None else p.logprobs
        grammar = req.grammar is not None
        sync = p.needs_penalties or bool(p.logits_processors)
        self.special[row] = sync or grammar or (p.seed is not None and not p.is_greedy)
        self.sync[row] = sync
        self.has_grammar[row] = grammar
        self.num_grammar += grammar
        self.prompt_logprobs[row] = p.prompt_logprobs is not None
        self.num_sync += sync
        self._params_dirty = True
        self.num_blocks[row] = 0
        self.num_registered[row] = 0
        self.num_released[row] = 0
        req.row, req._batch = row, self
        self.num_active += 1
        self._order.append(row)
        self._order_array = None
        self.sync_blocks(req)
        return row

    def remove(self, req: Request) -> None:
        """Take `req` out of its row (finished or preempted); its counters move back into the request."""
        row = req.row
        if row < 0:
            return
        req._num_computed = int(self.num_computed[row])
        req._num_pending = int(self.num_pending[row])
        req.row, req._batch = -1, None
        self.num_sync -= int(self.sync[row])
        self.num_grammar -= int(self.has_grammar[row])
        self.sync[row] = self.has_grammar[row] = False
        self.reqs[row] = None
        self.handle[row] = -1
        self.num_active -= 1
        self._free_rows.append(row)
        self._order.remove(row)
        self._order_array = None

    def order(self) -> np.ndarray:
        """Running rows in admission order."""
        if self._order_array is None:
            self._order_array = np.asarray(self._order, dtype=np.int64)
        return self._order_array

    def move_to_back(self, req: Request) -> None:
        """Order `req`'s row after every other (a request resumed after preemption rejoins at the end)."""
        self._order.remove(req.row)
        self._order.append(req.row)
        self._order_array = None

    def _widen_stops(self, n: int) -> None:
        r = self.max_rows
        ids = np.full((r, n), -1, np.int64)
        is_token = np.zeros((r, n), np.bool_)
        ids[:, : self.stop_ids.shape[1]] = self.stop_ids
        is_token[:, : self.stop_is_token.shape[1]] = self.stop_is_token
        self.stop_ids, self.stop_is_token = ids, is_token

    # -- block tables ----------------------------------------------------------------------------------
    def sync_blocks(self, req: Request) -> None:
        """Copy what changed in the request's block lists (new blocks, released window blocks) into its row
        of both tables, and queue the same entries for the device tables."""
        rb = self.kv.reqs.get(req.request_id)
        row = req.row
        if rb is None or row < 0:
            return
        full, sliding = rb.full or rb.sliding, rb.sliding or rb.full
        n = len(full)
        old, released = int(self.num_blocks[row]), int(self.num_released[row])
        # New entries from `old` on; entries the window released since the last sync from `released` on.
        start = old if rb.num_released == released else min(old, released)
        self.num_registered[row] = rb.num_registered
        if start >= n:
            return
        ft, st = self.full_table[row], self.sliding_table[row]
        rows, cols, fv, sv = self._diff_rows, self._diff_cols, self._diff_full, self._diff_sliding
        for j in range(start, n):
            f, sl = full[j], sliding[j]
            ft[j] = f
            st[j] = sl
            rows.append(row)
            cols.append(j)
            fv.append(f)
            sv.append(sl)
        self.num_blocks[row] = n
        self.num_released[row] = rb.num_released

    def flush(self) -> None:
        """Apply the queued table entries and changed sampling parameters to the device copies (queued on
        the stream before the step that reads them)."""
        if self._diff_rows:
            rows, cols, full, sliding = to_device(
                [
                    np.asarray(self._diff_rows, np.int64),
                    np.asarray(self._diff_cols, np.int64),
                    np.asarray(self._diff_full, np.int32),
                    np.asarray(self._diff_sliding, np.int32),
                ],
                self.device,
            )
            self.full_table_dev.index_put_((rows, cols), full)
            self.sliding_table_dev.index_put_((rows, cols), sliding)
            self._diff_rows, self._diff_cols, self._diff_full, self._diff_sliding = [], [], [], []
        if self._params_dirty:
            self.temperature_dev, self.top_p_dev, self.min_p_dev, self.top_k_dev = to_device(
                [self.temperature, self.top_p, self.min_p, self.top_k], self.device
            )
            self._params_dirty = False

    def tables_of(self, rows_dev: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (full, sliding) block tables: `rows_dev`'s rows, first `width` columns, on the device."""
        return (
            self.full_table_dev[:, :width].index_select(0, rows_dev),
            self.sliding_table_dev[:, :width].index_select(0, rows_dev),
        )
