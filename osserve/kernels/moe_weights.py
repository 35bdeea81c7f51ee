"""The experts of one MoE layer as one object (what every MoE op, twin or Triton, takes), and the layout of
(token, expert) pairs in expert order that the GEMM paths work on.

Rows are outputs, as in the checkpoint: w13 interleaves gate (even rows) and linear (odd rows), so the clamped
SwiGLU is an epilogue over row pairs. Packed experts hold MXFP4 blocks `[E, rows, cols / 32, 16]` (uint8, low
nibble first) and E8M0 scales `[E, rows, cols / 32]`; dense experts hold `[E, rows, cols]` and no scales.
Experts `expert_offset .. expert_offset + E - 1` are held here (expert parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEWeights:
    w13: torch.Tensor  # packed [E, 2I, H/32, 16] uint8, or dense [E, 2I, H]
    w13_scales: torch.Tensor | None  # [E, 2I, H/32] uint8 (packed only)
    w13_bias: torch.Tensor | None  # [E, 2I]
    w2: torch.Tensor  # packed [E, H, I/32, 16] uint8, or dense [E, H, I]
    w2_scales: torch.Tensor | None  # [E, H, I/32] uint8 (packed only)
    w2_bias: torch.Tensor | None  # [E, H]
    swiglu_limit: float
    swiglu_alpha: float
    expert_offset: int = 0
    # Optional bf16 copies of packed experts ([E, 2I, H], [E, H, I]; moe_config.bf16_experts): the grouped
    # path then multiplies them directly instead of dequantizing the layer on every call.
    w13_bf16: torch.Tensor | None = None
    w2_bf16: torch.Tensor | None = None

    def __post_init__(self) -> None:
        packed = self.w13_scales is not None
        if packed != (self.w2_scales is not None):
            raise ValueError("MoEWeights: give scales for both w13 and w2 (packed) or for neither (dense)")
        e, two_inter = self.w13.shape[:2]
        hidden = self.w13.shape[2] * 32 if packed else self.w13.shape[2]
        inter = two_inter // 2
        w2_shape = (e, hidden, inter // 32, 16) if packed else (e, hidden, inter)
        if two_inter % 2 or tuple(self.w2.shape) != w2_shape:
            raise ValueError(
                f"MoEWeights: w13 {tuple(self.w13.shape)} and w2 {tuple(self.w2.shape)} disagree on hidden / "
                f"intermediate sizes (want w2 {w2_shape})"
            )
        if packed:
            for name, blocks, scales in (("w13", self.w13, self.w13_scales), ("w2", self.w2, self.w2_scales)):
                if scales.shape != blocks.shape[:-1] or blocks.shape[-1] != 16:
                    raise ValueError(
                        f"MoEWeights: {name} blocks {tuple(blocks.shape)} need [..., G, 16] and scales "
                        f"[..., G], got scales {tuple(scales.shape)}"
                    )
                for t in (blocks, scales):
                    # NOTE: the Triton kernels derive every stride from the shapes.
                    if t.dtype != torch.uint8 or not t.is_contiguous():
                        raise ValueError(
                            f"MoEWeights: {name} blocks and scales must be contiguous uint8 "
                            f"(got {t.dtype}, strides {t.stride()})"
                        )
        if (self.w13_bf16 is None) != (self.w2_bf16 is None):
            raise ValueError("MoEWeights: give bf16 copies of both w13 and w2 or of neither")
        if self.w13_bf16 is not None:
            if not packed:
                raise ValueError(
                    "MoEWeights: bf16 copies are for packed experts (dense experts are bf16 already)"
                )
            for name, t, shape in (
                ("w13_bf16", self.w13_bf16, (e, two_inter, hidden)),
                ("w2_bf16", self.w2_bf16, (e, hidden, inter)),
            ):
                if tuple(t.shape) != shape or t.dtype != torch.bfloat16:
                    raise ValueError(f"MoEWeights: {name} is {tuple(t.shape)} {t.dtype}, want bf16 {shape}")
        for name, bias, rows in (("w13_bias", self.w13_bias, two_inter), ("w2_bias", self.w2_bias, hidden)):
            if bias is not None and (tuple(bias.shape) != (e, rows) or not bias.is_contiguous()):
                raise ValueError(f"MoEWeights: {name} is {tuple(bias.shape)}, want a contiguous {(e, rows)}")

    @property
    def packed(self) -> bool:
        return self.w13_scales is not None

    @property
    def has_bf16(self) -> bool:
        return self.w13_bf16 is not None

    @property
    def num_local(self) -> int:
        return self.w13.shape[0]

    @property
    def inter(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]


@dataclass(frozen=True)
class PairLayout:
    """(token, expert) pairs in expert order: each local expert's pairs in token order in consecutive slots,
    every expert's run padded to a multiple of block_m; all int32 (triton_moe_pairs.align_pairs, twin
    reference.align_pairs)."""

    slot_pair: torch.Tensor  # [max_blocks * block_m]: slot -> pair index (num_pairs: empty slot)
    pair_slot: torch.Tensor  # [pairs]: pair -> slot (pairs of experts not held here: unset; the twin: -1)
    block_expert: torch.Tensor  # [max_blocks]: block -> local expert (num_local: past the end)
    expert_end: torch.Tensor  # [num_local]: end slot of each expert's (padded) run
    num_padded: torch.Tensor  # [1]: slots in use, a multiple of block_m
    block_m: int
    max_blocks: int  # cdiv(pairs, block_m) + min(pairs, num_local): bounds the padded total
