"""MoE benchmark cases: the three regimes of triton_moe (gemv, gemm, grouped) and the dense MXFP4 dequantize.

The gemm sweeps hold the first kernel's byte-decode configurations beside the word-decode defaults, so one run
compares the old inner loop with the new one on the same cases.

gemv cases (decode sizes) are also timed inside a CUDA graph, cycling through copies of the routing with the
experts relabelled, so every replay reads other experts' weights from DRAM as a decode step does (the
layer's weights are never L2-resident in a real step: 23 other layers run in between). The pair counts
where two regimes are both measured give the crossovers `MAX_PAIRS` (gemv -> gemm) and `MIN_PAIRS`
(gemm -> grouped) that `auto` uses (bench/kernels.py, _moe_crossover).
"""

from __future__ import annotations

import dataclasses

import torch

from osserve.bench.kernel_cases import Case, Setup, _variants

# Distinct routings a graph-timed MoE case cycles through.
ROTATIONS = 8


def _relabelled(a, n: int = ROTATIONS) -> list:
    """a plus n - 1 copies whose expert ids are permuted (same load pattern, other weights)."""
    num, offset = a.experts.num_local, a.experts.expert_offset
    g = torch.Generator(device=a.topk_ids.device).manual_seed(1234)
    out = [a]
    for _ in range(n - 1):
        perm = torch.randperm(num, generator=g, device=a.topk_ids.device)
        out.append(dataclasses.replace(a, topk_ids=perm[a.topk_ids - offset] + offset))
    return out


def _token_lists(s: Setup, experts: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(gemv, gemm, grouped) token counts for this expert count; --quick and 128 experts run subsets."""
    if s.device == "cpu":
        return s.gemv_tokens, s.gemm_tokens, s.grouped_tokens

    def pick(tokens, keep):
        return tuple(t for t in tokens if t in keep)

    if experts > 32:  # 120b: gemv at 16 tokens too, beside the gemm there (the mid-size crossover)
        return (
            pick(s.gemv_tokens, (1, 4, 16)),
            pick(s.gemm_tokens, (16, 64, 1024)),
            pick(s.grouped_tokens, (1024, 4096)),
        )
    if s.quick:
        return (
            pick(s.gemv_tokens, (1, 2, 4, 16)),
            pick(s.gemm_tokens, (4, 16, 64, 256, 1024, 2048, 4096, 8192)),
            pick(s.grouped_tokens, (1024, 2048, 4096, 8192)),
        )
    return s.gemv_tokens, s.gemm_tokens, s.grouped_tokens


def moe_cases(s: Setup) -> list[Case]:
    from osserve.kernels import reference
    from osserve.kernels import triton_moe as tm
    from osserve.kernels import triton_mxfp4 as tmx
    from osserve.kernels.triton_testing import moe_inputs, random_mxfp4

    h, i = s.hidden, s.inter
    cpu = s.device == "cpu"

    def expert_bytes(a):
        held = torch.unique(a.topk_ids).numel()  # every routed expert is held here (no expert offset)
        per_expert = (2 * i * h + h * i) * (1 / 2 + 1 / 32) + (2 * i + h) * 4
        return held * per_expert + a.x.numel() * 2 * 2

    def flops(a):
        return 2 * a.topk_ids.numel() * (2 * i * h + h * i)

    # BLOCK_N 64: 4 rows per thread share the activations, 122 registers; BLOCK_K 512: twice the bytes per step.
    gemv = _variants(
        tm._INTERPRET_GEMV if cpu else tm.GEMV_DEFAULT,
        [
            {"BLOCK_N": 64},
            {"BLOCK_K": 512},
            {"DOWN_BLOCK_N": 8},
            {"PREFETCH": False},
            {"DEQUANT_ASM": False},
            {"PERM": False},
            {"num_warps": 8, "BLOCK_N": 64, "DOWN_BLOCK_N": 8},
            {"BLOCK_N": 16},
            {"BLOCK_K": 128},
            {"DOWN_BLOCK_N": 2},
            {"num_warps": 2, "BLOCK_N": 16, "DOWN_BLOCK_N": 2},
        ],
        s,
        quick=6,
    )
    # The byte-decode configurations the first kernel ran with in these buckets (runs 1-6: "small" below 24
    # pairs per expert, "mid" to 96), second in each list so --quick compares them too.
    byte_small = {"WORD": False, "SWAP": False, "BLOCK_N": 128, "BLOCK_K": 128}
    byte_mid = {"WORD": False, "SWAP": True, "BLOCK_N": 128, "BLOCK_K": 128}

    def word(first_kernel: dict) -> list[dict]:
        return [
            first_kernel,
            {"DEQUANT_ASM": True},
            {"BLOCK_N": 128, "num_warps": 8},
            {"BLOCK_K": 128},
            {"num_stages": 2},
            {"PERM": False},
            {"SWAP": False},
            {"num_stages": 4},
            byte_mid if first_kernel is byte_small else byte_small,
            dict(byte_small, DOT_SCALED=True),
        ]

    # Run 1 (H100): DOT_SCALED and SWAP lost by 1.6x at 8192 tokens; BLOCK_M 256 halves the decode work
    # per MMA (each weight tile is decoded once per BLOCK_M pairs).
    large = [
        # NOTE: 8 code tiles of BLOCK_M x BLOCK_K / 8 activations per K step: with BLOCK_M 128, 3 stages of
        # BLOCK_K 256 would not fit in shared memory.
        {"WORD": True, "SWAP": True, "BLOCK_K": 128, "num_stages": 2},
        {"BLOCK_M": 256},
        {"BLOCK_M": 256, "BLOCK_K": 128, "num_stages": 2},
        {"BLOCK_N": 256},
        {"BLOCK_K": 128, "num_stages": 2},
        {"DOT_SCALED": True},
        {"SWAP": True},
        {"num_stages": 4},
        {"num_warps": 4},
        {"DEQUANT_ASM": True},
    ]
    changes = {"m16": word(byte_small), "m32": word(byte_small), "m64": word(byte_mid), "m128": large}
    by_bucket = {
        b: _variants(tm._INTERPRET_GEMM if cpu else tm.gemm_default(b), changes[b], s) for b in changes
    }
    grouped = _variants(
        tm._INTERPRET_GROUPED if cpu else tm.GROUPED_DEFAULT,
        [{"SWIGLU_BLOCK_I": 256}, {"SWIGLU_BLOCK_M": 32}],
        s,
        quick=1,
    )
    cases = []
    for experts in s.experts:
        shape = f"h{h}-i{i}-e{experts}"
        gemv_t, gemm_t, grouped_t = _token_lists(s, experts)

        def make(t, e=experts):
            return lambda: moe_inputs(t, h, i, e, 4, torch.bfloat16, s.device, seed=t)

        def ref(a):
            return reference.moe_mxfp4(*a.args())

        def run(mode):
            return lambda a, c: tm.moe_mxfp4_launch(*a.args(), mode=mode, cfg=c)

        for t in gemv_t:
            cases.append(
                Case(
                    "moe_gemv",
                    shape,
                    f"moe gemv e{experts} T={t}",
                    make(t),
                    run("gemv"),
                    ref,
                    expert_bytes,
                    flops,
                    gemv,
                    params={"shape": shape, "pairs": 4 * t, "mode": "gemv"},
                    graph_inputs=_relabelled,
                )
            )
        for t in gemm_t:
            bucket = tm.gemm_bucket(4 * t, experts)
            cases.append(
                Case(
                    "moe_gemm",
                    f"{shape}-{bucket}",
                    f"moe gemm e{experts} T={t}",
                    make(t),
                    run("gemm"),
                    ref,
                    expert_bytes,
                    flops,
                    by_bucket[bucket],
                    params={"shape": shape, "pairs": 4 * t, "mode": "gemm"},
                    graph_inputs=_relabelled,
                )
            )
        for t in grouped_t:
            cases.append(
                Case(
                    "moe_grouped",
                    shape,
                    f"moe grouped e{experts} T={t}",
                    make(t),
                    run("grouped"),
                    ref,
                    expert_bytes,
                    flops,
                    grouped,
                    params={"shape": shape, "pairs": 4 * t, "mode": "grouped"},
                )
            )

    # The grouped path's dequantize of one layer's w13 (32 experts: 265 MB packed in, 1.06 GB bf16 out).
    experts = s.experts[0]

    def make_dq():
        g = torch.Generator(device=s.device).manual_seed(5)
        return random_mxfp4(experts, 2 * i, h, g)

    dq_cfgs = _variants(
        tmx._INTERPRET_DEQUANT if cpu else tmx.DEQUANT_DEFAULT,
        [
            {"BLOCK_K": 1024},
            {"BLOCK_M": 32, "BLOCK_K": 256},
            {"DEQUANT_ASM": True},
            {"num_warps": 8},
        ],
        s,
    )
    cases.append(
        Case(
            "mxfp4_dequant",
            "bfloat16",
            f"mxfp4_dequantize e{experts} w13",
            make_dq,
            lambda a, c: tmx.mxfp4_dequantize(a[0], a[1], torch.bfloat16, cfg=c),
            lambda a: reference.mxfp4_dequantize(a[0], a[1], torch.bfloat16),
            lambda a: a[0].numel() + a[1].numel() + a[0].numel() * 4,
            lambda a: 0.0,
            dq_cfgs,
            tol=1e-3,
        )
    )
    return cases
