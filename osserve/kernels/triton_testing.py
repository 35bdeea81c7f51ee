"""Random inputs and checks shared by tests/gpu and the kernel benchmark (python -m osserve.bench.kernels).

Inputs are fresh random tensors; everything a kernel must never read (the null block, unassigned blocks,
slots past a sequence's length or before its sliding window) is poisoned with NaN, so a kernel that reads
it fails the comparison with its twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osserve.kernels import reference
from osserve.kernels.metadata import AttentionMetadata
from osserve.kernels.moe_weights import MoEWeights


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 2e-2) -> float:
    """bf16-level agreement: |out - ref| <= tol * (|ref| + max|ref|) elementwise, no NaN or inf in either.
    Returns the largest error relative to max|ref|."""
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    # NOTE: a NaN in the reference would make every comparison below false, i.e. pass silently.
    if not torch.isfinite(ref).all():
        bad = (~torch.isfinite(ref)).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: the reference itself has non-finite values at {bad}")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite values at {bad}")
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out - ref).abs()
    worst = float(err.max() / scale) if err.numel() else 0.0
    bad = err > tol * (ref.abs() + scale)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} values off (max error {worst:.3g} of max|ref| "
            f"{float(scale):.3g}); first at {idx}: got {out[tuple(idx)]:.5g}, want {ref[tuple(idx)]:.5g}"
        )
    return worst


def poison_cuda_allocator(nbytes: int = 1 << 28) -> None:
    """Fill freed CUDA cache memory with NaN so outputs a kernel forgets to write show up as NaN."""
    if torch.cuda.is_available():
        buf = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        buf.fill_(float("nan"))
        del buf


# ---------------------------------------------------------------------------------------------------------
# Paged attention


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    sinks: torch.Tensor
    scale: float
    # Rows of q / out that belong to some sequence (the rest is padding).
    num_live_rows: int

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.meta, self.sinks, self.scale


def attention_inputs(
    seqs: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
    pad_rows: int = 0,
    spare_blocks: int = 3,
) -> AttentionInputs:
    """seqs: (seq_len, query_len) per sequence; its new queries are its last query_len positions."""
    g = torch.Generator(device=device).manual_seed(seed)
    nblocks = [-(-n // block_size) for n, _ in seqs]
    num_blocks = 1 + sum(nblocks) + spare_blocks
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    max_blocks = max(nblocks, default=0) + 2  # extra zero columns: the kernel must respect seq_lens
    table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    slots, qsl, used = [], [0], 0
    for i, (seq_len, qlen) in enumerate(seqs):
        first_visible = 0 if window is None else max(0, seq_len - qlen - window + 1)
        row = perm[used : used + nblocks[i]].to(torch.int32)
        used += nblocks[i]
        # Blocks wholly before the window stay the null block 0, as a sliding-window block table has them.
        row[: first_visible // block_size] = 0
        table[i, : nblocks[i]] = row
        pos = torch.arange(first_visible, seq_len)
        live[row[pos // block_size].long() * block_size + pos % block_size] = True
        new = torch.arange(seq_len - qlen, seq_len)
        slots.append(row[new // block_size].long() * block_size + new % block_size)
        qsl.append(qsl[-1] + qlen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    live = live.to(device).view(num_blocks, block_size)
    k_cache = torch.randn(shape, generator=g, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=g, device=device).to(dtype)
    k_cache[~live] = float("nan")
    v_cache[~live] = float("nan")
    num_rows = qsl[-1] + pad_rows
    q = torch.randn(num_rows, num_q_heads, head_dim, generator=g, device=device).to(dtype)
    sinks = torch.randn(num_q_heads, generator=g, device=device) + 1.0
    seq_lens = [n for n, _ in seqs]
    meta = AttentionMetadata(
        block_table=table.to(device),
        slot_mapping=torch.cat(slots).to(device)
        if slots
        else torch.zeros(0, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        max_query_len=max((q for _, q in seqs), default=0),
        max_seq_len=max(seq_lens, default=0),
        sliding_window=window,
    )
    return AttentionInputs(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        meta=meta,
        sinks=sinks,
        scale=head_dim**-0.5,
        num_live_rows=qsl[-1],
    )


# ---------------------------------------------------------------------------------------------------------
# MXFP4 mixture of experts


def random_mxfp4(
    num_experts: int, rows: int, cols: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed weights [E, rows, cols/32, 16] and E8M0 scales [E, rows, cols/32] near gpt-oss magnitudes."""
    dev = g.device
    blocks = torch.randint(
        0, 256, (num_experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8, device=dev
    )
    scales = torch.randint(
        116, 123, (num_experts, rows, cols // 32), generator=g, dtype=torch.uint8, device=dev
    )
    return blocks, scales


@dataclass
class MoeInputs:
    x: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    experts: MoEWeights

    def args(self) -> tuple:
        return self.x, self.topk_weights, self.topk_ids, self.experts


def moe_inputs(
    num_tokens: int,
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
    num_local: int | None = None,
    expert_offset: int = 0,
    bias: bool = True,
    skew: float = 0.0,
) -> MoeInputs:
    """Routing over num_experts experts of which [expert_offset, expert_offset + num_local) are held here.
    skew > 0 biases the router toward low expert ids (uneven expert loads)."""
    g = torch.Generator(device=device).manual_seed(seed)
    num_local = num_experts if num_local is None else num_local
    x = torch.randn(num_tokens, hidden, generator=g, device=device)
    skews = skew * torch.arange(num_experts, device=device) / num_experts
    logits = torch.randn(num_tokens, num_experts, generator=g, device=device) - skews
    weights, ids = reference.route(logits.to(dtype), top_k)
    w13, w13_scales = random_mxfp4(num_local, 2 * inter, hidden, g)
    w2, w2_scales = random_mxfp4(num_local, hidden, inter, g)
    b13 = torch.randn(num_local, 2 * inter, generator=g, device=device) * 0.5 if bias else None
    b2 = torch.randn(num_local, hidden, generator=g, device=device) * 0.5 if bias else None
    experts = MoEWeights(w13, w13_scales, b13, w2, w2_scales, b2, 7.0, 1.702, expert_offset)
    return MoeInputs(x=x.to(dtype), topk_weights=weights, topk_ids=ids, experts=experts)
