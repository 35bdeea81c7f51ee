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
from osserve.engine.cuda_graph import DecodeGraphs
from osserve.engine.input_batch import InputBatch
from osserve.engine.outputs import PromptLogprobs
from osserve.engine.request import Request
from osserve.engine.scheduler import SchedulerOutput
from osserve.engine.staging import to_device
from osserve.kernels import select_ops
from osserve.layers.sampler import Sampler, SamplingBatch, compute_logprobs
from osserve.model.batch import ForwardBatch, null_block_batch
from osserve.model.gpt_oss import GptOssModel
from osserve.structured import allocate_bitmask, fill_bitmasks

logger = logging.getLogger(__name__)

# Rows of prompt logits turned into logprobs at a time (each row is vocab_size floats).
_PROMPT_LOGPROB_CHUNK = 256


@dataclass
class StepHandle:
    """A launched step: its device work is queued; `ModelRunner.collect` waits for it and reads it."""

    sched: SchedulerOutput
    # Rows that sample this step, in logits order, and the handles that held them at launch (a row given to
    # another request before the results are read must not take them).
    sample_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample_handles: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Host copies (pinned on CUDA, filled asynchronously) of the sampled ids and, when some row asked, the
    # logprob ids / values / ranks; the event marks them complete.
    host: list[torch.Tensor | None] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    # Recorded after the step's forward and logits (CUDA), sampled rows or not: the next eager forward
    # waits for it (ModelRunner.launch).
    forward_done: torch.cuda.Event | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # (logits, sampling rows on the device, SamplingBatch) of a step whose sampling is not queued yet.
    pending: tuple[torch.Tensor, torch.Tensor, SamplingBatch] | None = None


@dataclass
class StepResult:
    """A collected step: per sampling row, the token; logprob arrays when some row asked."""

    rows: np.ndarray
    handles: np.ndarray
    tokens: np.ndarray  # [n] int64
    lp_ids: np.ndarray | None = None  # [n, 1 + k]
    lp_values: np.ndarray | None = None
    lp_ranks: np.ndarray | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


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
        self.bf16_expert_bytes = self._keep_bf16_experts()
        self.sampler = Sampler(self.model.ops.apply_token_bitmask)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.vocab_size = model.config.vocab_size
        # Set by osserve.distributed on every rank of a parallel engine: entered around each forward, it keeps
        # the ranks in step (rank 0 sends the batch to the others; attention-DP ranks share token counts).
        self.forward_sync: Callable[[ForwardBatch], AbstractContextManager] | None = None

    def _keep_bf16_experts(self) -> int:
        """moe_config.bf16_experts: dequantize the packed experts once and keep the copies beside them (before
        the KV cache takes what is left). Returns the bytes kept."""
        moe = self.config.moe_config
        if not getattr(self.model, "packed_experts", False) or moe.bf16_experts is False:
            return 0
        if moe.backend not in ("auto", "grouped"):
            return 0  # no grouped GEMMs to feed
        mlps = [layer.mlp for layer in self.model.layers]
        need = sum(m.bf16_copy_bytes() for m in mlps)
        total = torch.cuda.get_device_properties(self.device).total_memory
        if moe.bf16_experts is None and need > total // 3:
            logger.info(
                "no bf16 copies of the experts: they would take %.1f GB, over a third of the GPU "
                "(moe_config.bf16_experts true keeps them anyway)",
                need / 1e9,
            )
            return 0
        start = time.perf_counter()
        for m in mlps:
            m.keep_bf16_copy(self.model.ops.mxfp4_dequantize)
        logger.info(
            "bf16 copies of the experts: %.1f GB (%.0f%% of the GPU) in %.1f s; large batches skip the "
            "dequantize (moe_config.bf16_experts)",
            need / 1e9,
            100 * need / total,
            time.perf_counter() - start,
        )
        return need

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

    @torch.inference_mode()
    def warm_up(self, sizes: list[int] | None = None) -> list[int]:
        """Run eager forwards of prefill sizes once, so that Triton compiles (and autotunes) the prefill
        variants of its kernels at startup rather than inside the first prompts' steps. The K/V they write go
        to the null block 0, which no live sequence reads. Returns the sizes run (none off CUDA unless given;
        none for a parallel engine, whose ranks would have to join)."""
        if sizes is None and (self.device.type != "cuda" or self.model.parallel.is_distributed):
            return []
        start = time.perf_counter()
        budget = self.config.max_num_tokens
        if sizes is None:
            # NOTE: Triton specializes integer arguments on divisibility by 16: the odd sizes give the variants
            # for token and pair counts that are not (a prompt's last chunk), budget // 2 + 1 on the grouped
            # MoE path, 17 on the gemm one.
            sizes = sorted(
                {n for n in (budget, budget // 2 + 1, 1000, 100, 17) if 1 < n <= budget}, reverse=True
            )
        for n in sizes:
            batch = null_block_batch(n, self.block_size, self.model_config.sliding_window, self.device)
            self.model.compute_logits(self.model(batch, self.kv_caches)[batch.logits_indices])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warmed up prefill sizes %s in %.1f s", sizes, time.perf_counter() - start)
        return sizes

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
        self, sched: SchedulerOutput, b: InputBatch
    ) -> tuple[ForwardBatch, np.ndarray, torch.Tensor, list[tuple[Request, int, int, int]]]:
        """Build the ForwardBatch from the batch rows' arrays. Also returns the sampling rows (batch rows
        whose sequence reaches the end of its known tokens this step) on the host and on the device, and the
        prompt-logprob spans (request, first row, first prompt position, count)."""
        bs = self.block_size
        rows, q = sched.rows, sched.num_new
        n = len(rows)
        start = b.num_computed[rows]
        known = b.num_tokens[rows]
        pending = b.num_pending[rows]
        seq_lens = start + q
        qsl = np.zeros(n + 1, np.int64)
        np.cumsum(q, out=qsl[1:])
        num_tokens = int(qsl[-1])
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(qsl[:-1] - start, q)
        token_rows = np.repeat(rows, q)
        blk, off = positions // bs, positions % bs
        full_slots = b.full_table[token_rows, blk].astype(np.int64) * bs + off
        sliding_slots = b.sliding_table[token_rows, blk].astype(np.int64) * bs + off
        # Inputs known on the host come from there: the last known token (a decode after a synchronous step)
        # or a slice of the prompt and output (a prefill chunk). The one input that is not known yet is the
        # token the step in flight samples: it is gathered on the device from last_token_dev.
        ids = np.zeros(num_tokens, np.int64)
        host_q = np.clip(known - start, 0, q)
        last = (host_q == 1) & (q == 1) & (start == known - 1)
        ids[qsl[:-1][last]] = b.last_token[rows[last]]
        for i in np.flatnonzero((host_q > 0) & ~last).tolist():
            req = b.reqs[rows[i]]
            s0, h = int(start[i]), int(host_q[i])
            ids[qsl[i] : qsl[i] + h] = req.token_ids_slice(s0, s0 + h)
        unknown = host_q < q
        if (q[unknown] - host_q[unknown] > 1).any():
            raise RuntimeError("a step input beyond the pending token is not known yet")
        gather_dst = qsl[1:][unknown] - 1
        gather_src = rows[unknown]
        samples = seq_lens >= known + pending
        sample_rows = rows[samples]
        sample_pos = qsl[1:][samples] - 1
        prompt_spans: list[tuple[Request, int, int, int]] = []
        if b.prompt_logprobs[rows].any():
            for i in np.flatnonzero(b.prompt_logprobs[rows]).tolist():
                req = b.reqs[rows[i]]
                s0, e = int(start[i]), int(seq_lens[i])
                if req.num_prompt_logprobs_launched < req.num_prompt_tokens:
                    # The row at position j - 1 gives the entry of prompt token j (token 0 has none).
                    j0 = max(req.num_prompt_logprobs_launched, s0 + 1)
                    j1 = min(e + 1, req.num_prompt_tokens)
                    prompt_spans.append((req, int(qsl[i]) + j0 - 1 - s0, j0, max(0, j1 - j0)))
        width = max(1, -(-int(seq_lens.max()) // bs)) if n else 1
        b.flush()
        (
            input_ids,
            positions_t,
            full_slots_t,
            sliding_slots_t,
            logits_t,
            src_t,
            dst_t,
            rows_t,
            sample_rows_t,
            qsl_t,
            lens_t,
        ) = to_device(
            [
                ids,
                positions,
                full_slots,
                sliding_slots,
                sample_pos,
                gather_src,
                gather_dst,
                rows,
                sample_rows,
                qsl.astype(np.int32),
                seq_lens.astype(np.int32),
            ],
            self.device,
        )
        if len(gather_dst):
            input_ids.index_copy_(0, dst_t, b.last_token_dev.index_select(0, src_t))
        full_t, sliding_t = b.tables_of(rows_t, width)
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions_t,
            query_start_loc=qsl_t,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens=lens_t,
            seq_lens_cpu=seq_lens.tolist(),
            full_block_table=full_t,
            sliding_block_table=sliding_t,
            full_slot_mapping=full_slots_t,
            sliding_slot_mapping=sliding_slots_t,
            logits_indices=logits_t,
            sliding_window=self.model_config.sliding_window,
            num_tokens=num_tokens,
            max_query_len=int(q.max()) if n else 0,
        )
        return batch, sample_rows, sample_rows_t, prompt_spans

    def prepare_sampling(self, b: InputBatch, sample_rows: np.ndarray, rows_t: torch.Tensor) -> SamplingBatch:
        """The sampling parameters of `sample_rows`, gathered on the device from the batch's copies; rows
        with per-request needs (seeds, logits processors, penalties) are visited one by one."""
        sb = SamplingBatch(
            temperature=b.temperature_dev.index_select(0, rows_t),
            top_p=b.top_p_dev.index_select(0, rows_t),
            top_k=b.top_k_dev.index_select(0, rows_t),
            min_p=b.min_p_dev.index_select(0, rows_t),
            all_greedy=bool(b.greedy[sample_rows].all()),
            any_greedy=bool(b.greedy[sample_rows].any()),
            any_top_p_or_k=bool(((b.top_p[sample_rows] < 1.0) | (b.top_k[sample_rows] > 0)).any()),
            any_min_p=bool((b.min_p[sample_rows] > 0).any()),
        )
        k = int(b.logprobs[sample_rows].max())
        if k >= 0:
            sb.max_num_logprobs = k
        # Rows short of min_tokens may not sample their stop tokens yet (their stop table: stop_token_ids and
        # the eos tokens unless ignore_eos).
        produced = b.num_tokens[sample_rows] - b.num_prompt[sample_rows] + b.num_pending[sample_rows]
        short = np.flatnonzero(produced < b.min_tokens[sample_rows])
        if len(short):
            ids = b.stop_ids[sample_rows[short]]
            keep = ids >= 0
            if keep.any():
                rows_t, ids_t = to_device(
                    [np.repeat(short, ids.shape[1])[keep.ravel()], ids[keep]], self.device
                )
                sb.blocked = (rows_t, ids_t)
        special = np.flatnonzero(b.special[sample_rows]).tolist()
        if not special:
            return sb
        # NOTE: only the special rows' requests: one seeded or grammar request in a batch of hundreds costs one
        # lookup per step, not a list of the whole batch.
        reqs = {i: b.reqs[sample_rows[i]] for i in special}
        dev = self.device
        for i, r in reqs.items():
            p = r.sampling_params
            if p.seed is not None and not p.is_greedy:
                if r.generator is None:
                    r.generator = torch.Generator(device=dev)
                    # Samples of one n > 1 request get consecutive seeds, as in vLLM.
                    r.generator.manual_seed(p.seed + r.sample_index)
                sb.generators[i] = r.generator
            if p.logits_processors:
                sb.logits_processors.append((i, p.logits_processors, r.output_token_ids))
        if any(r.sampling_params.needs_penalties for r in reqs.values()):
            self._add_penalties(sb, reqs, len(sample_rows))
        sb.grammars = [(i, r.grammar) for i, r in reqs.items() if r.grammar is not None]
        return sb

    def _fill_grammar_masks(self, sb: SamplingBatch) -> None:
        """The allowed next tokens of the batch's grammar rows, as a bitmask on the device. Each grammar must
        have seen every token its request sampled before (see EngineCore._step)."""
        if not sb.grammars:
            return
        live = [(i, g) for i, g in sb.grammars if not g.done]
        bitmask = allocate_bitmask(len(sb.grammars))
        if live:
            # NOTE: a grammar that ended (its request finished after this step was planned) allows anything:
            # its token is dropped.
            filled = fill_bitmasks([g for _, g in live])
            at = {i: j for j, (i, _) in enumerate(sb.grammars)}
            bitmask[[at[i] for i, _ in live]] = filled
        sb.token_bitmask, sb.bitmask_rows = to_device(
            [bitmask, np.asarray([i for i, _ in sb.grammars], dtype=np.int64)], self.device
        )

    def _add_penalties(self, sb: SamplingBatch, reqs: dict[int, Request], n: int) -> None:
        """Penalty tensors for `n` sampling rows; rows without penalties (absent from `reqs` or with neutral
        values) are left unpenalized."""
        dev, v = self.device, self.vocab_size
        presence, frequency, repetition = (
            np.zeros(n, np.float32),
            np.zeros(n, np.float32),
            np.ones(n, np.float32),
        )
        for i, r in reqs.items():
            p = r.sampling_params
            presence[i], frequency[i], repetition[i] = (
                p.presence_penalty,
                p.frequency_penalty,
                p.repetition_penalty,
            )
        sb.presence_penalty, sb.frequency_penalty, sb.repetition_penalty = (
            torch.from_numpy(a).to(dev) for a in (presence, frequency, repetition)
        )
        sb.output_counts = torch.zeros(n, v, dtype=torch.float32, device=dev)
        sb.prompt_mask = torch.zeros(n, v, dtype=torch.bool, device=dev)
        for i, r in reqs.items():
            if not r.sampling_params.needs_penalties:
                continue
            if r.output_token_ids:
                out = torch.tensor(r.output_token_ids, dtype=torch.int64, device=dev)
                sb.output_counts[i].scatter_add_(0, out, torch.ones_like(out, dtype=torch.float32))
            sb.prompt_mask[i, torch.tensor(r.prompt_token_ids, dtype=torch.int64, device=dev)] = True

    def run_model(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states of `batch`, from a captured decode graph where one fits. Every rank of a
        parallel engine runs each forward through here, on the same batch."""
        if self.forward_sync is None:
            return self._forward(batch)
        with self.forward_sync(batch):
            return self._forward(batch)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self._graphed(batch):
            return self.graphs.run(batch)  # type: ignore[union-attr]
        return self.model(batch, self.kv_caches)

    def _graphed(self, batch: ForwardBatch) -> bool:
        return self.graphs is not None and self.graphs.can_run(batch)

    def _wait_forward(self, after: StepHandle | None) -> None:
        """Wait until the forward of the step launched before is done, counted as device wait.

        An eager forward queues hundreds of kernels (a 16k-token prefill of gpt-oss-120b: ~900). Behind a
        step still running, CUDA's launch queue fills and the host blocks inside the launches for the rest
        of that step, which the step log then shows as host time (docs/PERFORMANCE.md, run 26). Waiting
        here instead costs the device nothing when it is the bottleneck: this step's inputs are queued
        already and its first kernel follows the wait at once; when the host is, the step is done already."""
        if after is None or after.forward_done is None:
            return
        t0 = time.perf_counter()
        after.forward_done.synchronize()
        self.device_wait_s += time.perf_counter() - t0

    @torch.inference_mode()
    def launch(
        self,
        sched: SchedulerOutput,
        b: InputBatch,
        defer_sampling: bool = False,
        after: StepHandle | None = None,
    ) -> StepHandle:
        """Queue the step's device work; returns before it completes (on CUDA). `defer_sampling`: queue the
        forward and the logits only; `sample(handle)` queues the rest once the grammars are up to date.
        `after`: the step launched before, still in flight (an eager forward waits for its forward)."""
        batch, sample_rows, rows_t, prompt_spans = self.prepare_batch(sched, b)
        if not self._graphed(batch):
            self._wait_forward(after)
        hidden = self.run_model(batch)
        handle = StepHandle(sched, sample_rows, b.handle[sample_rows])
        for req, row, pos, count in prompt_spans:
            handle.prompt_logprobs.append(self._prompt_logprobs(req, hidden, row, pos, count))
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if len(sample_rows) else None
        if self.device.type == "cuda":
            handle.forward_done = torch.cuda.Event()
            handle.forward_done.record()
        if logits is None:
            return handle
        handle.pending = (logits, rows_t, self.prepare_sampling(b, sample_rows, rows_t))
        if not defer_sampling:
            self.sample(handle, b)
        return handle

    @torch.inference_mode()
    def sample(self, handle: StepHandle, b: InputBatch) -> None:
        """Queue the sampling of a launched step whose sampling was deferred (a no-op otherwise)."""
        if handle.pending is None:
            return
        logits, rows_t, sb = handle.pending
        handle.pending = None
        self._fill_grammar_masks(sb)
        out = self.sampler(logits, sb)
        # The next step's decode inputs read the sampled tokens from here, in stream order.
        b.last_token_dev.index_copy_(0, rows_t, out.sampled)
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

    def collect(self, handle: StepHandle) -> StepResult:
        """Wait for a launched step and read its sampled tokens (and logprobs) back."""
        res = StepResult(handle.sample_rows, handle.sample_handles, np.zeros(0, np.int64))
        res.prompt_logprobs = handle.prompt_logprobs
        if not len(handle.sample_rows):
            return res
        if handle.event is not None:
            t0 = time.perf_counter()
            handle.event.synchronize()
            self.device_wait_s += time.perf_counter() - t0
        tok_t, ids_t, lps_t, ranks_t = handle.host
        assert tok_t is not None
        res.tokens = tok_t.numpy().copy()
        if ids_t is not None and lps_t is not None and ranks_t is not None:
            res.lp_ids = ids_t.numpy().astype(np.int32)
            res.lp_values = lps_t.numpy().astype(np.float32)
            res.lp_ranks = ranks_t.numpy().astype(np.int32)
        return res

    def _prompt_logprobs(
        self, req: Request, hidden: torch.Tensor, row: int, j0: int, count: int
    ) -> PromptLogprobs:
        k = req.sampling_params.prompt_logprobs or 0
        req.num_prompt_logprobs_launched = max(req.num_prompt_logprobs_launched, j0 + count, 1)
        targets = req.prompt_token_ids[j0 : j0 + count]
        ids_parts, lps_parts, ranks_parts = [], [], []
        for c0 in range(0, count, _PROMPT_LOGPROB_CHUNK):
            c1 = min(count, c0 + _PROMPT_LOGPROB_CHUNK)
            logits = self.model.compute_logits(hidden[row + c0 : row + c1])
            tgt = torch.tensor(targets[c0:c1], dtype=torch.int64, device=logits.device)
            ids, lps, ranks = compute_logprobs(torch.log_softmax(logits, dim=-1), tgt, k)
            ids_parts.append(ids.cpu().numpy().astype(np.int32))
            lps_parts.append(lps.float().cpu().numpy())
            ranks_parts.append(ranks.cpu().numpy().astype(np.int32))
        if not ids_parts:
            empty = np.zeros((0, 1 + k), np.int32)
            return PromptLogprobs(req.handle, j0, empty, empty.astype(np.float32), np.zeros(0, np.int32))
        return PromptLogprobs(
            req.handle,
            j0,
            np.concatenate(ids_parts),
            np.concatenate(lps_parts),
            np.concatenate(ranks_parts),
        )
