"""ModelRunner: turns a SchedulerOutput into device tensors, runs the model, samples.

It owns the KV tensors (one K and one V tensor per layer slot, shared by full layer j and sliding layer j),
the op table (Triton on CUDA, PyTorch elsewhere) and the sampler. It never decides who runs: that is the
scheduler's job; it only computes what it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from osserve.config import SLIDING, EngineConfig
from osserve.engine.batch import ForwardBatch
from osserve.engine.cuda_graph import DecodeGraphs
from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.request import Request
from osserve.engine.scheduler import SchedulerOutput
from osserve.engine.staging import to_device
from osserve.kernels import select_ops
from osserve.layers.sampler import Sampler, SamplingBatch, compute_logprobs
from osserve.model.gpt_oss import GptOssModel
from osserve.structured import fill_bitmasks

logger = logging.getLogger(__name__)

# Rows of prompt logits turned into logprobs at a time (each row is vocab_size floats).
_PROMPT_LOGPROB_CHUNK = 256

LogprobEntry = dict[int, tuple[float, int]]


@dataclass
class RequestStepResult:
    # The token sampled this step, or None for a prefill chunk that did not reach the end of the prompt.
    token: int | None = None
    logprobs: LogprobEntry | None = None
    prompt_logprobs: list[LogprobEntry | None] = field(default_factory=list)


@dataclass
class StepHandle:
    """A launched step: its device work is queued; `ModelRunner.collect` waits for it and reads it."""

    sched: SchedulerOutput
    results: dict[str, RequestStepResult]
    # Requests that sample this step, in row order, and each one's row.
    sampling_reqs: list[Request] = field(default_factory=list)
    row_of: dict[str, int] = field(default_factory=dict)
    # [N] int64 on the device: the next step reads pending input tokens from here.
    sampled: torch.Tensor | None = None
    # Host copies (pinned on CUDA, filled asynchronously) and the event that marks them complete.
    host: list[torch.Tensor | None] = field(default_factory=list)
    event: torch.cuda.Event | None = None


def kv_layer_slots(layer_types: tuple[str, ...]) -> list[int]:
    """For each layer, the index of the K/V tensor pair it uses (its rank within its own layer type)."""
    counts = {True: 0, False: 0}
    slots = []
    for t in layer_types:
        s = t == SLIDING
        slots.append(counts[s])
        counts[s] += 1
    return slots


class ModelRunner:
    def __init__(
        self,
        model: GptOssModel,
        config: EngineConfig,
        device: torch.device,
        block_size: int,
        max_seq_len: int,
    ):
        self.model = model
        # Seconds the host spent waiting for launched steps to finish (the rest of a step is host work).
        self.device_wait_s = 0.0
        self.max_seq_len = max_seq_len
        self.graphs: DecodeGraphs | None = None
        self.config = config
        self.device = device
        self.block_size = block_size
        self.model_config = model.config
        self.model.ops = select_ops(device.type, config.attention_backend, config.moe_config.backend)
        self.sampler = Sampler(self.model.ops.apply_token_bitmask)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.vocab_size = model.config.vocab_size
        # Set by osserve.distributed on every rank of a parallel engine: entered around each forward, it keeps
        # the ranks in step (rank 0 sends the batch to the others; attention-DP ranks share token counts).
        self.forward_sync: Callable[[ForwardBatch], AbstractContextManager] | None = None

    # -- KV cache --------------------------------------------------------------------------------------
    @property
    def num_kv_slots(self) -> int:
        slots = kv_layer_slots(self.model_config.layer_types)
        return max(slots) + 1

    def kv_bytes_per_block(self) -> int:
        attn = self.model.layers[0].self_attn
        per_slot = 2 * self.block_size * attn.num_kv_heads * attn.head_dim * self.model.dtype.itemsize
        return self.num_kv_slots * per_slot

    def activation_bytes_estimate(self, max_num_tokens: int) -> int:
        """Generous bound on the transient memory of the largest step (activations, logits, sampling)."""
        c = self.model_config
        per_token = 16 * c.hidden_size + 4 * c.intermediate_size * c.num_experts_per_tok + 2 * c.q_size
        logits = self.config.max_batch_size * c.vocab_size * 4 * 6
        return max_num_tokens * per_token * 4 + logits + (256 << 20)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        attn = self.model.layers[0].self_attn
        shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        tensors = [
            (
                torch.zeros(shape, dtype=self.model.dtype, device=self.device),
                torch.zeros(shape, dtype=self.model.dtype, device=self.device),
            )
            for _ in range(self.num_kv_slots)
        ]
        self.kv_caches = [tensors[s] for s in kv_layer_slots(self.model_config.layer_types)]

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs where they are safe: CUDA, graphs enabled, capture-safe (Triton) ops."""
        sizes = [s for s in self.config.cuda_graph_config.batch_sizes if s <= self.config.max_batch_size]
        if self.device.type != "cuda" or not sizes:
            return
        if self.model.parallel.is_distributed:
            # NOTE: capturing the forward's NCCL calls on every rank (each replaying the same bucket through
            # run_model) hung on 2 H200s (docs/PERFORMANCE.md, run 10); parallel engines run eagerly.
            logger.info("CUDA graphs off: parallel engines run eagerly")
            return
        if not self.model.ops.graph_safe:
            logger.info("CUDA graphs off: the %s ops are not capture-safe", self.model.ops.name)
            return
        width = -(-self.max_seq_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, sizes, width, self.device)
        self.graphs.capture()

    # -- one step --------------------------------------------------------------------------------------
    def prepare_batch(
        self, sched: SchedulerOutput, kv: KVCacheManager, prev: StepHandle | None = None
    ) -> tuple[ForwardBatch, list[int], list[tuple[Request, int, int, int]]]:
        """Build the ForwardBatch. Also returns the flat rows to sample (one per request that reached the
        end of its known tokens, else -1) and the prompt-logprob spans (request, first row, first prompt
        position, count)."""
        bs = self.block_size
        n_seqs = len(sched.scheduled)
        num_tokens = sched.num_tokens
        ids: list[int] = []
        positions = np.empty(num_tokens, dtype=np.int64)
        full_slots = np.empty(num_tokens, dtype=np.int64)
        sliding_slots = np.empty(num_tokens, dtype=np.int64)
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[tuple[list[int], list[int]]] = []
        sample_rows: list[int] = []
        prompt_spans: list[tuple[Request, int, int, int]] = []
        gather_dst: list[int] = []
        gather_src: list[int] = []
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            end = start + n
            full, sliding = kv.blocks_of(req.request_id).arrays()
            row0 = qsl[-1]
            known = min(end, req.num_tokens)
            ids += req.token_ids_slice(start, known)
            if end > known:
                # The last input is the token the step in flight samples: gathered on the device below.
                if prev is None or req.request_id not in prev.row_of or end != known + 1:
                    raise RuntimeError(f"request {req.request_id}: input token {known} is not known yet")
                ids.append(0)
                gather_dst.append(row0 + n - 1)
                gather_src.append(prev.row_of[req.request_id])
            if n == 1:
                positions[row0] = start
                blk, off = divmod(start, bs)
                full_slots[row0] = int(full[blk]) * bs + off
                sliding_slots[row0] = int(sliding[blk]) * bs + off
            else:
                pos = np.arange(start, end, dtype=np.int64)
                positions[row0 : row0 + n] = pos
                blk, off = pos // bs, pos % bs
                full_slots[row0 : row0 + n] = full[blk].astype(np.int64) * bs + off
                sliding_slots[row0 : row0 + n] = sliding[blk].astype(np.int64) * bs + off
            tables.append((full, sliding))
            qsl.append(row0 + n)
            seq_lens.append(end)
            sample_rows.append(row0 + n - 1 if end >= req.num_tokens + req.num_pending else -1)
            if req.wants_prompt_logprobs and req.num_prompt_logprobs_launched < req.num_prompt_tokens:
                # The row at position j - 1 gives the entry of prompt token j (token 0 has none).
                j0 = max(req.num_prompt_logprobs_launched, start + 1)
                j1 = min(end + 1, req.num_prompt_tokens)
                prompt_spans.append((req, row0 + j0 - 1 - start, j0, max(0, j1 - j0)))
        width = max(len(f) for f, _ in tables)
        full_table = np.zeros((n_seqs, width), dtype=np.int32)
        sliding_table = np.zeros((n_seqs, width), dtype=np.int32)
        for i, (f, sl) in enumerate(tables):
            full_table[i, : len(f)] = f
            sliding_table[i, : len(sl)] = sl
        logits_rows = [r for r in sample_rows if r >= 0]
        (
            input_ids,
            positions_t,
            full_slots_t,
            sliding_slots_t,
            logits_t,
            src,
            dst,
            qsl_t,
            lens_t,
            full_t,
            sliding_t,
        ) = to_device(
            [
                np.asarray(ids, dtype=np.int64),
                positions,
                full_slots,
                sliding_slots,
                np.asarray(logits_rows, dtype=np.int64),
                np.asarray(gather_src, dtype=np.int64),
                np.asarray(gather_dst, dtype=np.int64),
                np.asarray(qsl, dtype=np.int32),
                np.asarray(seq_lens, dtype=np.int32),
                full_table,
                sliding_table,
            ],
            self.device,
        )
        if gather_dst:
            assert prev is not None and prev.sampled is not None
            input_ids.index_copy_(0, dst, prev.sampled.index_select(0, src))
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions_t,
            query_start_loc=qsl_t,
            query_start_loc_cpu=qsl,
            seq_lens=lens_t,
            seq_lens_cpu=seq_lens,
            full_block_table=full_t,
            sliding_block_table=sliding_t,
            full_slot_mapping=full_slots_t,
            sliding_slot_mapping=sliding_slots_t,
            logits_indices=logits_t,
            sliding_window=self.model_config.sliding_window,
            num_tokens=len(ids),
        )
        return batch, sample_rows, prompt_spans

    def prepare_sampling(self, reqs: list[Request]) -> SamplingBatch:
        dev = self.device
        ps = [r.sampling_params for r in reqs]
        temperature, top_p, min_p, top_k = to_device(
            [
                np.asarray([p.temperature for p in ps], dtype=np.float32),
                np.asarray([p.top_p for p in ps], dtype=np.float32),
                np.asarray([p.min_p for p in ps], dtype=np.float32),
                np.asarray([p.top_k for p in ps], dtype=np.int64),
            ],
            dev,
        )
        sb = SamplingBatch(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            all_greedy=all(p.is_greedy for p in ps),
            any_top_p_or_k=any(p.top_p < 1.0 or p.top_k > 0 for p in ps),
            any_min_p=any(p.min_p > 0 for p in ps),
        )
        if any(p.needs_penalties for p in ps):
            n, v = len(reqs), self.vocab_size
            sb.presence_penalty = torch.tensor(
                [p.presence_penalty for p in ps], dtype=torch.float32, device=dev
            )
            sb.frequency_penalty = torch.tensor(
                [p.frequency_penalty for p in ps], dtype=torch.float32, device=dev
            )
            sb.repetition_penalty = torch.tensor(
                [p.repetition_penalty for p in ps], dtype=torch.float32, device=dev
            )
            sb.output_counts = torch.zeros(n, v, dtype=torch.float32, device=dev)
            sb.prompt_mask = torch.zeros(n, v, dtype=torch.bool, device=dev)
            for i, r in enumerate(reqs):
                if r.output_token_ids:
                    out = torch.tensor(r.output_token_ids, dtype=torch.int64, device=dev)
                    sb.output_counts[i].scatter_add_(0, out, torch.ones_like(out, dtype=torch.float32))
                sb.prompt_mask[i, torch.tensor(r.prompt_token_ids, dtype=torch.int64, device=dev)] = True
        grammar_rows: list[int] = []
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if r.grammar is not None:
                grammar_rows.append(i)
            if p.seed is not None and not p.is_greedy:
                if r.generator is None:
                    r.generator = torch.Generator(device=dev)
                    # Samples of one n > 1 request get consecutive seeds, as in vLLM.
                    r.generator.manual_seed(p.seed + r.sample_index)
                sb.generators[i] = r.generator
            if len(r.output_token_ids) + r.num_pending < p.min_tokens:
                blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(r.eos_token_ids))
                if blocked:
                    sb.blocked_tokens.append((i, blocked))
            if p.logits_processors:
                sb.logits_processors.append((i, p.logits_processors, r.output_token_ids))
            if p.logprobs is not None:
                sb.max_num_logprobs = max(sb.max_num_logprobs or 0, p.logprobs)
        if grammar_rows:
            # NOTE: the step is synchronous (EngineCore._needs_host_outputs), so each grammar has seen
            # every token sampled so far.
            bitmask = fill_bitmasks([reqs[i].grammar for i in grammar_rows])  # type: ignore[misc]
            sb.token_bitmask, sb.bitmask_rows = to_device(
                [bitmask, np.asarray(grammar_rows, dtype=np.int64)], dev
            )
        return sb

    def run_model(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states of `batch`, from a captured decode graph where one fits. Every rank of a
        parallel engine runs each forward through here, on the same batch."""
        if self.forward_sync is None:
            return self._forward(batch)
        with self.forward_sync(batch):
            return self._forward(batch)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model(batch, self.kv_caches)

    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, kv: KVCacheManager, prev: StepHandle | None = None
    ) -> StepHandle:
        """Queue the step's device work; returns before it completes (on CUDA)."""
        batch, sample_rows, prompt_spans = self.prepare_batch(sched, kv, prev)
        hidden = self.run_model(batch)
        # Results only for requests that get one (a token or prompt logprobs); the others read as empty.
        handle = StepHandle(sched, {})
        for req, row, pos, count in prompt_spans:
            handle.results[req.request_id] = RequestStepResult(
                prompt_logprobs=self._prompt_logprobs(req, hidden, row, pos, count)
            )
        handle.sampling_reqs = [
            req for (req, _), r in zip(sched.scheduled, sample_rows, strict=True) if r >= 0
        ]
        if not handle.sampling_reqs:
            return handle
        handle.row_of = {req.request_id: i for i, req in enumerate(handle.sampling_reqs)}
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        out = self.sampler(logits, self.prepare_sampling(handle.sampling_reqs))
        handle.sampled = out.sampled
        device_out = [out.sampled, out.logprob_token_ids, out.logprobs, out.sampled_ranks]
        if self.device.type == "cuda":
            # Copies into pinned memory, in stream order after this step's kernels; the event lets the
            # engine wait for exactly this step while the next one is already queued.
            handle.host = [
                None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                for t in device_out
            ]
            for h, t in zip(handle.host, device_out, strict=True):
                if h is not None:
                    h.copy_(t, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record()
        else:
            handle.host = device_out
        return handle

    def collect(self, handle: StepHandle) -> dict[str, RequestStepResult]:
        """Wait for a launched step and turn its sampled tokens and logprobs into per-request results."""
        if not handle.sampling_reqs:
            return handle.results
        if handle.event is not None:
            t0 = time.perf_counter()
            handle.event.synchronize()
            self.device_wait_s += time.perf_counter() - t0
        tok_t, ids_t, lps_t, ranks_t = handle.host
        assert tok_t is not None
        tokens = tok_t.tolist()
        lp_ids = ids_t.tolist() if ids_t is not None else None
        lps = lps_t.tolist() if lps_t is not None else None
        ranks = ranks_t.tolist() if ranks_t is not None else None
        for i, req in enumerate(handle.sampling_reqs):
            res = handle.results.get(req.request_id)
            if res is None:
                res = handle.results[req.request_id] = RequestStepResult()
            res.token = tokens[i]
            k = req.sampling_params.logprobs
            if k is not None and lp_ids is not None and lps is not None and ranks is not None:
                entry = {tokens[i]: (lps[i][0], ranks[i])}
                for j in range(1, 1 + k):
                    entry.setdefault(lp_ids[i][j], (lps[i][j], j))
                res.logprobs = entry
        return handle.results

    def _prompt_logprobs(
        self, req: Request, hidden: torch.Tensor, row: int, j0: int, count: int
    ) -> list[LogprobEntry | None]:
        k = req.sampling_params.prompt_logprobs or 0
        entries: list[LogprobEntry | None] = [] if req.num_prompt_logprobs_launched else [None]
        req.num_prompt_logprobs_launched = max(req.num_prompt_logprobs_launched, j0 + count, 1)
        targets = req.prompt_token_ids[j0 : j0 + count]
        for c0 in range(0, count, _PROMPT_LOGPROB_CHUNK):
            c1 = min(count, c0 + _PROMPT_LOGPROB_CHUNK)
            logits = self.model.compute_logits(hidden[row + c0 : row + c1])
            tgt = torch.tensor(targets[c0:c1], dtype=torch.int64, device=logits.device)
            ids, lps, ranks = compute_logprobs(torch.log_softmax(logits, dim=-1), tgt, k)
            ids_l, lps_l, ranks_l = ids.tolist(), lps.tolist(), ranks.tolist()
            for i in range(c1 - c0):
                entry = {ids_l[i][0]: (lps_l[i][0], ranks_l[i])}
                for j in range(1, 1 + k):
                    entry.setdefault(ids_l[i][j], (lps_l[i][j], j))
                entries.append(entry)
        return entries
