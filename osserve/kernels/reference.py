"""Pure-PyTorch twins of every kernel: the CPU path, and the reference the Triton kernels are tested against.

Each function here has the same signature as its Triton version in this package, so the runner can pick one
or the other by device and backend option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from osserve.kernels.metadata import AttentionMetadata
from osserve.kernels.moe_weights import MoEWeights, PairLayout

# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 -> dense. blocks [..., G, 16] uint8 (low nibble first), scales [..., G] uint8 (E8M0, bias 127).

    Returns [..., G * 32] in `dtype`: the rows keep the checkpoint's (out_features, in_features) order.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"mxfp4: blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; returns (rms_norm(residual), residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, half-split (not interleaved). q [T, Hq, D], k [T, Hk, D], positions [T]."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    cos = (freqs.cos() * scaling).to(q.dtype)[:, None, :]
    sin = (freqs.sin() * scaling).to(q.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys / values [T, Hk, D] in the paged cache [num_blocks, block_size, Hk, D]."""
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(
        0, slot_mapping, k.to(k_cache.dtype)
    )
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(
        0, slot_mapping, v.to(v_cache.dtype)
    )


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope_tables: tuple[torch.Tensor, float],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope with rope_tables = (inv_freq, scaling), then write_kv of the rotated keys and the values into
    kv_cache = (k_cache, v_cache); returns the rotated (q, k)."""
    q, k = rope(q, k, positions, *rope_tables)
    write_kv(k, v, *kv_cache, slot_mapping)
    return q, k


def _gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    block_size = cache.shape[1]
    b0 = start // block_size
    b1 = -(-end // block_size)
    kv = cache[block_ids[b0:b1].long()].flatten(0, 1)  # [(b1-b0)*bs, Hk, D]
    return kv[start - b0 * block_size : end - b0 * block_size]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention with per-head sink logits over the paged cache (new K/V already written).

    q [T, Hq, D]; returns [T, Hq, D] in q's dtype. Query j of sequence i sits at position
    seq_len - query_len + j and sees keys at positions p <= it, and with a sliding window W only p > it - W.
    """
    if meta.max_query_len == 1 and q.shape[0] == len(meta.seq_lens_cpu):
        return _decode_attention(q, k_cache, v_cache, meta, sinks, scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    window = meta.sliding_window
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i, ctx in enumerate(lens):
        q0, q1 = qsl[i], qsl[i + 1]
        qlen = q1 - q0
        if qlen == 0:
            continue
        first_q = ctx - qlen
        k_start = 0 if window is None else max(0, first_q - window + 1)
        k = _gather_kv(k_cache, meta.block_table[i], k_start, ctx).float()
        v = _gather_kv(v_cache, meta.block_table[i], k_start, ctx).float()
        qi = q[q0:q1].float().view(qlen, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qi, k) * scale  # [Hk, G, qlen, klen]
        q_pos = torch.arange(first_q, ctx, device=q.device)[:, None]
        k_pos = torch.arange(k_start, ctx, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, qlen, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        o = torch.einsum("hgqk,khd->qhgd", probs, v)
        out[q0:q1] = o.reshape(qlen, num_heads, head_dim).to(q.dtype)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """paged_attention when every sequence has one query: all sequences at once, keys padded."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    window = meta.sliding_window
    n_keys = meta.max_seq_len if window is None else min(window, meta.max_seq_len)
    lens = meta.seq_lens.long()[:, None]
    pos = (lens - n_keys).clamp(min=0) + torch.arange(n_keys, device=q.device)[None, :]
    valid = pos < lens
    if window is not None:
        valid &= pos > lens - 1 - window
    width = meta.block_table.shape[1]
    blocks = meta.block_table.long().gather(1, (pos // block_size).clamp(max=width - 1))
    slots = (blocks * block_size + pos % block_size).flatten()
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].view(num_seqs, n_keys, num_kv_heads, head_dim).float()
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].view(num_seqs, n_keys, num_kv_heads, head_dim).float()
    # NOTE: padded key positions gather whatever their slot holds (the null block, stale or NaN-poisoned
    # entries); a probability of 0 times NaN is still NaN, so they are zeroed, not just masked in the scores.
    dead = ~valid[:, :, None, None]
    k, v = k.masked_fill(dead, 0.0), v.masked_fill(dead, 0.0)
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("shgd,skhd->shgk", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    sink = sinks.float().view(1, num_kv_heads, group, 1).expand(num_seqs, -1, -1, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("shgk,skhd->shgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def swiglu(h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved rows: even = gate, odd = linear; +1 on the linear half."""
    gate = h[..., ::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token, softmax over the selected logits. Returns (weights [T, k], ids [T, k])."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), ids


def align_pairs(topk_ids: torch.Tensor, expert_offset: int, num_local: int, block_m: int) -> PairLayout:
    """(token, expert) pairs in expert order (see PairLayout); pairs of experts not held here are left out."""
    ids = topk_ids.reshape(-1)
    num_pairs, dev = ids.numel(), ids.device
    local = ids - expert_offset
    key = torch.where((local >= 0) & (local < num_local), local, num_local)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_local + 1)[:num_local]
    padded = -(-counts // block_m) * block_m
    ends = padded.cumsum(0)
    max_blocks = -(-num_pairs // block_m) + min(num_pairs, num_local)
    # Slot of the i-th pair in expert order: its expert's padded start + its rank among that expert's pairs.
    e = key[order]
    held = e < num_local
    e_held = e.clamp(max=max(num_local - 1, 0))
    rank = torch.arange(num_pairs, device=dev) - (counts.cumsum(0) - counts)[e_held]
    slot = ((ends - padded)[e_held] + rank)[held]
    slot_pair = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=dev)
    slot_pair[slot] = order[held].to(torch.int32)
    pair_slot = torch.full((num_pairs,), -1, dtype=torch.int32, device=dev)
    pair_slot[order[held]] = slot.to(torch.int32)
    starts = torch.arange(max_blocks, device=dev)[:, None] * block_m
    return PairLayout(
        slot_pair=slot_pair,
        pair_slot=pair_slot,
        block_expert=(ends[None, :] <= starts).sum(1).to(torch.int32),
        expert_end=ends.to(torch.int32),
        num_padded=padded.sum().reshape(1).to(torch.int32),
        block_m=block_m,
        max_blocks=max_blocks,
    )


def combine_pairs(
    y: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: MoEWeights,
    pair_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum over t's top-k pairs p held here of (y[row p] + b2[e_p]) * w_p, where row p is p itself or,
    with `pair_slot`, its slot in expert order; summed in float32, k in order."""
    num_tokens, top_k = topk_ids.shape
    local = topk_ids.reshape(-1) - experts.expert_offset
    held = (local >= 0) & (local < experts.num_local)
    rows = torch.arange(num_tokens * top_k, device=y.device) if pair_slot is None else pair_slot.long()
    v = y[torch.where(held, rows, 0)].float()
    if experts.w2_bias is not None:
        v = v + experts.w2_bias[torch.where(held, local, 0)].float()
    v = torch.where(held[:, None], v * topk_weights.reshape(-1, 1).float(), 0.0)
    return v.view(num_tokens, top_k, -1).sum(1).to(y.dtype)


def _moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: MoEWeights,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The expert loop shared by moe_dense and moe_mxfp4; `expert_weights(e)` gives (w13, w2) of local e."""
    out = torch.zeros_like(x)
    local_ids = topk_ids - experts.expert_offset
    b13, b2 = experts.w13_bias, experts.w2_bias
    for e in torch.unique(local_ids).tolist():
        if e < 0 or e >= experts.num_local:
            continue
        w13, w2 = expert_weights(e)
        tok, slot = torch.where(local_ids == e)
        h = x[tok] @ w13.t()
        if b13 is not None:
            h = h + b13[e].to(h.dtype)
        y = swiglu(h, experts.swiglu_limit, experts.swiglu_alpha) @ w2.t()
        if b2 is not None:
            y = y + b2[e].to(y.dtype)
        out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(x.dtype))
    return out


def moe_dense(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: MoEWeights
) -> torch.Tensor:
    """Mixture of experts over dense weights (the CPU layout): tokens routed to experts not held here
    contribute nothing on this rank."""
    return _moe(x, topk_weights, topk_ids, experts, lambda e: (experts.w13[e], experts.w2[e]))


def moe_mxfp4(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: MoEWeights
) -> torch.Tensor:
    """moe_dense over packed MXFP4 weights, dequantizing one expert at a time (the Triton paths' twin)."""

    def weights(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            mxfp4_dequantize(experts.w13[e], experts.w13_scales[e], x.dtype),
            mxfp4_dequantize(experts.w2[e], experts.w2_scales[e], x.dtype),
        )

    return _moe(x, topk_weights, topk_ids, experts, weights)


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """Set to -inf, in place, the logits of tokens a grammar forbids.

    logits [N, V] float; bitmask [M, W] int32, bit `t % 32` of word `t // 32` set where token t is allowed;
    indices [M] int64: the logits row of each bitmask row (None: row i of both, M == N). Columns past
    32 * W count as forbidden; bits past V are ignored.
    """
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :vocab].bool()
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]))
    if indices is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[indices] = logits[indices].masked_fill(~allowed, float("-inf"))
