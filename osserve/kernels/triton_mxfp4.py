"""MXFP4 decode in Triton: the register-level helpers the MoE kernels share, and a dense dequantize kernel.

Twin of `mxfp4_dequantize`: reference.mxfp4_dequantize. Packed rows hold 16 bytes of E2M1 codes per group of
32 values (low nibble first) and one E8M0 scale byte per group.

Two decodes of the 4-bit code (sign s, exponent e1 e0, mantissa m), both exact:
- byte path (`_load_mxfp4`): each byte's nibbles are interleaved into natural order and each code's bits are
  moved to fp16 bits 15 / 11..10 / 9; that fp16 is the value times 2^-14 (e = 0 lands on an fp16 subnormal,
  which the fp16 -> fp32 conversion keeps exact). Optional inline PTX (ASM) does two codes per 32-bit op.
- word path (`_e2m1_pair`): 32-bit words of 8 codes; one shift / mask pair builds the fp16 bits of codes i and
  i + 4 in the two halves of one register, so the decode costs two integer ops per code pair instead of
  about five per code. Values come out in the order (i, i + 4), so the activations are read in that order.
The E8M0 scale s becomes the fp32 factor 2^(s - 127 + 14) by writing s + 14 into the exponent field (valid
for s <= 240; gpt-oss scales sit near 120).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.moe_weights import MoEWeights
from osserve.kernels.triton_common import config_for, interpreting

# Optional inline-PTX decode (config DEQUANT_ASM): 4 packed bytes in -> 4 low-nibble and 4 high-nibble
# values out as fp32, each value * 2^-14 exactly as the Triton decode gives. prmt moves bytes 0, 1 (then
# 2, 3) into the two 16-bit halves of a register so that one shift / mask builds two fp16 bit patterns at
# once (magnitude bits -> fp16 bits 9..11, sign -> bit 15); cvt.f32.f16 is exact for the subnormals.
_E2M1_HALF = """
shl.b32 m, t, {mag}; and.b32 m, m, 0x0E000E00;
shl.b32 s, t, {sign}; and.b32 s, s, 0x80008000; or.b32 m, m, s;
mov.b32 {{h0, h1}}, m; cvt.f32.f16 ${o0}, h0; cvt.f32.f16 ${o1}, h1;"""
# NOTE: a tl.constexpr, so @jit functions may read it (plain globals are refused at compile time).
_E2M1_ASM = tl.constexpr(
    "{\n.reg .b32 z, t, m, s;\n.reg .b16 h0, h1;\nmov.b32 z, 0;\nprmt.b32 t, $8, z, 0x4140;"
    + _E2M1_HALF.format(mag=9, sign=12, o0=0, o1=1)
    + _E2M1_HALF.format(mag=5, sign=8, o0=4, o1=5)
    + "\nprmt.b32 t, $8, z, 0x4342;"
    + _E2M1_HALF.format(mag=9, sign=12, o0=2, o1=3)
    + _E2M1_HALF.format(mag=5, sign=8, o0=6, o1=7)
    + "\n}"
)


@triton.jit
def _load_mxfp4(
    w_ptr, s_ptr, rows, rmask, k0, KG, stride_wn, stride_sn, BLOCK_K: tl.constexpr, ASM: tl.constexpr
):
    """Rows `rows` x columns k0 .. k0 + BLOCK_K of one expert's packed matrix (KG groups per row).

    Returns (values * 2^-14 as fp32 [R, BLOCK_K], scale factors 2^(s - 113) as fp32 [R, BLOCK_K / 32]).
    """
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    # NOTE: bounds as KG * 16 (not K // 2): Triton then knows the mask is constant over 16 bytes and
    # issues 16-byte loads.
    packed = tl.load(
        w_ptr + rows[:, None] * stride_wn + kb[None, :],
        mask=rmask[:, None] & (kb[None, :] < KG * 16),
        other=0,
    )
    kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    sc = tl.load(
        s_ptr + rows[:, None] * stride_sn + kg[None, :], mask=rmask[:, None] & (kg[None, :] < KG), other=0
    )
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            _E2M1_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [packed],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=4,
        )
        vals = tl.interleave(lo, hi)  # low nibble first
    else:
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.uint16)  # low nibble first
        bits = ((codes & 7) << 9) | ((codes & 8) << 12)
        vals = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return vals, _scale_factor(sc)


@triton.jit
def _scale_factor(sc):
    """E8M0 scale bytes -> fp32 2^(s - 113): the group's scale times the 2^14 the decodes leave out."""
    return ((sc.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_mxfp4(
    w_ptr, s_ptr, rows, rmask, k0, KG, stride_wn, stride_sn, BLOCK_K: tl.constexpr, ASM: tl.constexpr
):
    """Dense fp32 tile [R, BLOCK_K] of the weights (for tl.dot)."""
    vals, factor = _load_mxfp4(w_ptr, s_ptr, rows, rmask, k0, KG, stride_wn, stride_sn, BLOCK_K, ASM)
    vals = tl.reshape(vals, [vals.shape[0], BLOCK_K // 32, 32]) * factor[:, :, None]
    return tl.reshape(vals, [vals.shape[0], BLOCK_K])


@triton.jit
def _f16x2_to_f32(f, ASM: tl.constexpr):
    """The two fp16 halves of each 32-bit element of f, as fp32 (low half, high half)."""
    if ASM:
        # One cvt per half straight from the register halves (the Triton form below makes LLVM repack
        # halves of different registers first).
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=r,=r,r",
            [f],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        lo = (f & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (f >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e2m1_pair(t, i: tl.constexpr, ASM: tl.constexpr):
    """Codes i and i + 4 (i < 4) of each uint32 word t of 8 codes, as fp32 values times 2^-14.

    Code j of a word sits at bits 4j .. 4j + 3 (little-endian bytes, low nibble first), i.e. it is value
    8w + j of the row. One shift / mask moves code i to fp16 bits 9..11 (+ sign 15) of the low half and
    code i + 4 to the same bits of the high half.
    """
    if i < 3:
        f = (t << (9 - 4 * i)) & 0x0E000E00
    else:
        f = (t >> 3) & 0x0E000E00
    f = f | ((t << (12 - 4 * i)) & 0x80008000)
    return _f16x2_to_f32(f, ASM)


def use_asm(cfg: dict) -> bool:
    """Whether a config's DEQUANT_ASM applies: inline PTX cannot run under the interpreter."""
    return bool(cfg.get("DEQUANT_ASM", False)) and not interpreting()


def experts_stage(experts: MoEWeights, stage: int, dummy: torch.Tensor) -> tuple[tuple, int, int, bool]:
    """The packed weights of projection `stage` (1: w13, 2: w2) as every MoE kernel takes them (contiguous, so
    the kernels derive the strides): ((blocks, scales, bias or `dummy`), K / 32, N, whether there is a bias)."""
    if stage == 1:
        blocks, scales, bias = experts.w13, experts.w13_scales, experts.w13_bias
    else:
        blocks, scales, bias = experts.w2, experts.w2_scales, experts.w2_bias
    return (
        (blocks, scales, dummy if bias is None else bias),
        blocks.shape[2],
        blocks.shape[1],
        bias is not None,
    )


# ---------------------------------------------------------------------------------------------------------
# Dense dequantize (the large-batch MoE path dequantizes a layer's experts once, then runs bf16 GEMMs)


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    M,
    KG,
    stride_wm,
    stride_sm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows = rows.to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    vals = _dequant_mxfp4(w_ptr, s_ptr, rows, rmask, k0, KG, stride_wm, stride_sm, BLOCK_K, ASM)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        vals.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & (cols[None, :] < KG * 32),
    )


DEQUANT_DEFAULT = {"BLOCK_M": 16, "BLOCK_K": 512, "DEQUANT_ASM": False, "num_warps": 4}
_INTERPRET_DEQUANT = {"BLOCK_M": 8, "BLOCK_K": 64, "DEQUANT_ASM": False, "num_warps": 1}


def mxfp4_dequantize(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    cfg: dict | None = None,
) -> torch.Tensor:
    """MXFP4 -> dense [..., G * 32] in `dtype` (same contract as reference.mxfp4_dequantize).

    blocks [..., G, 16] uint8 with packed rows, scales [..., G] uint8. `out` may be given (a reused buffer).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16 or blocks.dtype != torch.uint8:
        raise ValueError(
            f"mxfp4: blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales "
            f"{tuple(scales.shape)} (want blocks [..., G, 16] uint8, scales [..., G])"
        )
    groups = blocks.shape[-2]
    w = blocks.reshape(-1, groups * 16)
    s = scales.reshape(-1, groups)
    shape = (*blocks.shape[:-2], groups * 32)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"mxfp4_dequantize: out must be a contiguous {shape}, got {tuple(out.shape)}")
    o = out.view(-1, groups * 32)
    m = w.shape[0]
    if m == 0:
        return out
    if cfg is None:
        cfg = config_for(
            "mxfp4_dequant",
            str(dtype).removeprefix("torch."),
            _INTERPRET_DEQUANT if interpreting() else DEQUANT_DEFAULT,
        )
    asm = use_asm(cfg)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(groups * 32, cfg["BLOCK_K"]))
    _dequant_kernel[grid](
        w,
        s,
        o,
        m,
        groups,
        w.stride(0),
        s.stride(0),
        o.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        ASM=asm,
        num_warps=cfg["num_warps"],
    )
    return out
