"""Batched sampling on the device: penalties, grammar bitmasks, temperature, top-k / top-p / min-p, seeds,
logprobs.

One call handles every row of the step; the only host sync is the caller's read of the sampled ids.
Random rows draw exponential noise E and take argmax(logits / T - log E), which is argmax(probs / E) without
the softmax (log probs differ from logits / T by a per-row constant) and samples from probs; a seeded request
draws its noise from its own generator, so its output does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from osserve.kernels import reference
from osserve.sampling_params import LogitsProcessor


@dataclass
class SamplingBatch:
    # [N] per row; greedy rows have temperature 0.
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    all_greedy: bool
    any_top_p_or_k: bool
    any_min_p: bool
    # Whether some row is greedy (temperature 0) in a batch that is not all greedy.
    any_greedy: bool = True
    # Penalties (None when no row uses them): [N] each, plus [N, V] output token counts and prompt mask.
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    # Row -> generator for seeded rows.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # (rows, token ids), one pair per entry: tokens that may not be sampled yet (stop / eos tokens before
    # min_tokens).
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None
    # (row, processors, output token ids so far).
    logits_processors: list[tuple[int, list[LogitsProcessor], list[int]]] = field(default_factory=list)
    # Largest number of top logprobs any row asked for; None: no row wants logprobs.
    max_num_logprobs: int | None = None
    # Grammar-constrained rows (None when no row has a grammar): [M, ceil(V / 32)] int32 allowed-token bits
    # and [M] int64 the row of each.
    # Grammar rows (index, GrammarMatcher) while their bitmask is not filled yet (osserve.engine.runner).
    grammars: list[tuple[int, Any]] = field(default_factory=list)
    token_bitmask: torch.Tensor | None = None
    bitmask_rows: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [N] int64
    # With logprobs: [N, 1 + k] token ids and logprobs, column 0 the sampled token; [N] its rank.
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


def compute_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of log-probabilities: ids [N, 1 + k] and logprobs [N, 1 + k] (chosen token first, then the
    top k), and the chosen token's rank (1 = most likely)."""
    chosen = logprobs.gather(-1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        ids = torch.cat((token_ids[:, None], top_ids), dim=-1)
        lps = torch.cat((chosen, top_lp), dim=-1)
    else:
        ids, lps = token_ids[:, None], chosen
    return ids, lps, ranks


class Sampler:
    def __init__(self, apply_token_bitmask: Callable = reference.apply_token_bitmask_):
        # The op table's bitmask kernel (Triton on CUDA).
        self.apply_token_bitmask = apply_token_bitmask

    def __call__(self, logits: torch.Tensor, sb: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if sb.max_num_logprobs is not None else None
        if sb.output_counts is not None:
            logits = self._apply_penalties(logits, sb)
        elif sb.blocked is not None or sb.logits_processors or sb.token_bitmask is not None:
            logits = logits.clone()  # edited in place below; the caller's logits stay as the model made them
        if sb.blocked is not None:
            logits[sb.blocked] = float("-inf")
        for row, procs, out_ids in sb.logits_processors:
            for proc in procs:
                logits[row] = proc(out_ids, logits[row])
        if sb.token_bitmask is not None:
            self.apply_token_bitmask(logits, sb.token_bitmask, sb.bitmask_rows)
        if sb.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif sb.any_greedy:
            sampled = torch.where(sb.temperature < 1e-5, logits.argmax(dim=-1), self._sample(logits, sb))
        else:
            sampled = self._sample(logits, sb)
        out = SamplerOutput(sampled=sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = compute_logprobs(
                raw_logprobs, sampled, sb.max_num_logprobs or 0
            )
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        counts = sb.output_counts
        assert counts is not None and sb.prompt_mask is not None
        seen = sb.prompt_mask | (counts > 0)
        rep = sb.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - sb.frequency_penalty[:, None] * counts
        logits = logits - sb.presence_penalty[:, None] * (counts > 0).float()
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        temp = torch.where(sb.temperature < 1e-5, torch.ones_like(sb.temperature), sb.temperature)
        logits = logits / temp[:, None]
        if sb.any_top_p_or_k:
            logits = _top_k_top_p(logits, sb.top_k, sb.top_p)
        if sb.any_min_p:
            # probs < min_p * max(probs)  <=>  logits < max(logits) + log(min_p)
            top = logits.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(logits < top + torch.log(sb.min_p[:, None]), float("-inf"))
        noise = torch.empty_like(logits).exponential_()
        for row, gen in sb.generators.items():
            noise[row].exponential_(generator=gen)
        return (logits - noise.log()).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p); top_k 0 means no limit."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_logits.gather(-1, (vocab - k).long()[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    drop = cum <= (1 - top_p[:, None])
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
