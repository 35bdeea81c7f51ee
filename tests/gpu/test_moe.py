"""Triton MXFP4 mixture of experts against reference.moe_mxfp4 in its three regimes (gemv, gemm with the
byte and the word decode, grouped), the pair permutation, the Triton dequantize against
reference.mxfp4_dequantize, regime choice, CUDA-graph replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from osserve.kernels import reference, triton_moe, triton_moe_pairs, triton_mxfp4  # noqa: E402
from osserve.kernels.triton_testing import assert_close, moe_inputs, poison_cuda_allocator, random_mxfp4  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402

# (hidden, intermediate, experts, top_k)
if INTERPRET:
    SHAPES = [(64, 64, 8, 4), (96, 160, 6, 4)]
    TOKENS = [1, 3, 11]
else:
    SHAPES = [(64, 64, 8, 4), (96, 160, 6, 4), (2880, 2880, 32, 4), (2880, 2880, 128, 4)]
    TOKENS = [1, 3, 16, 77, 512, 2048]


def _reference(inp):
    return reference.moe_mxfp4(*inp.args())


def _gemm_cfgs() -> dict[str, dict]:
    if INTERPRET:
        base = triton_moe._INTERPRET_GEMM
        return {
            "word": base,
            "word-noperm-noswap": dict(base, PERM=False, SWAP=False),
            "byte-noswap-bk32": dict(base, WORD=False, SWAP=False, BLOCK_K=32),
            "byte-m32": dict(base, WORD=False, BLOCK_M=32, BLOCK_K=64),
        }
    m16, m32, m64, m128 = (triton_moe.gemm_default(b) for b in ("m16", "m32", "m64", "m128"))
    byte_small = {"WORD": False, "SWAP": False, "BLOCK_N": 128, "BLOCK_K": 128}
    # NOTE: the benchmark checks every config it sweeps against the twin; these cover each code path once.
    return {
        "m16": m16,
        "m32": m32,
        "m64": m64,
        "m128": m128,
        "m16-asm": dict(m16, DEQUANT_ASM=True),
        "m64-word": dict(m64, WORD=True, PERM=True, BLOCK_N=64, BLOCK_K=256),
        "m64-word-noperm-noswap": dict(m64, WORD=True, PERM=False, SWAP=False, BLOCK_N=64, BLOCK_K=256),
        # The first kernel's configurations ("small", "mid"), with tl.dot_scaled and the inline-PTX decode.
        "m16-byte": dict(m16, **byte_small),
        "m16-byte-scaled": dict(m16, **byte_small, DOT_SCALED=True),
        "m16-byte-asm": dict(m16, **byte_small, DEQUANT_ASM=True),
        "m64-byte-scaled": dict(m64, WORD=False, BLOCK_N=128, BLOCK_K=128, DOT_SCALED=True),
        "m128-scaled": dict(m128, DOT_SCALED=True),
        "m128-word-swap": dict(m128, WORD=True, SWAP=True, BLOCK_K=128, num_stages=2),
    }


def _gemv_cfgs() -> dict[str, dict]:
    base = triton_moe._INTERPRET_GEMV if INTERPRET else triton_moe.GEMV_DEFAULT
    cfgs = {
        "gemv": base,
        "noprefetch-bk32": dict(base, PREFETCH=False, BLOCK_K=32),
        "noperm": dict(base, PERM=False),
        "rows": dict(base, BLOCK_N=32, DOWN_BLOCK_N=2),
    }
    if not INTERPRET:
        cfgs["noasm"] = dict(base, DEQUANT_ASM=False)
    return cfgs


def _grouped_cfgs() -> dict[str, dict]:
    base = triton_moe._INTERPRET_GROUPED if INTERPRET else triton_moe.GROUPED_DEFAULT
    return {
        "grouped": base,
        "grouped-blocks": dict(base, SWIGLU_BLOCK_M=4, SWIGLU_BLOCK_I=16, COMBINE_BLOCK=32),
    }


def _cfgs(mode: str) -> dict[str, dict]:
    return {"gemv": _gemv_cfgs, "gemm": _gemm_cfgs, "grouped": _grouped_cfgs}[mode]()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_moe_auto(device, shape, num_tokens):
    h, i, e, k = shape
    poison_cuda_allocator()
    inp = moe_inputs(num_tokens, h, i, e, k, torch.bfloat16, device, seed=num_tokens)
    out = triton_moe.moe_mxfp4(*inp.args())
    assert_close(out, _reference(inp), f"moe auto T={num_tokens}")


MODE_CFGS = [(m, k) for m in triton_moe.MOE_MODES for k in _cfgs(m)]


@pytest.mark.parametrize(
    "shape", SHAPES[:2] if INTERPRET else SHAPES[1:3], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("mode,cfg_name", MODE_CFGS, ids=[f"{m}-{c}" for m, c in MODE_CFGS])
def test_moe_modes(device, shape, mode, cfg_name):
    h, i, e, k = shape
    cfg = _cfgs(mode)[cfg_name]
    # skew: uneven expert loads, some experts get no token at all (empty groups)
    num_tokens = 2 if INTERPRET and mode == "gemv" else 5  # NOTE: the interpreter runs programs one by one
    inp = moe_inputs(num_tokens, h, i, e, k, torch.bfloat16, device, seed=len(cfg_name), skew=3.0)
    out = triton_moe.moe_mxfp4_launch(*inp.args(), mode=mode, cfg=cfg)
    assert_close(out, _reference(inp), f"moe {mode} {cfg}")


EP_MODES = ["gemv", "gemm-word", "gemm-byte", "grouped"]


@pytest.mark.parametrize("mode", EP_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_moe_expert_parallel_slice(device, mode, bias):
    """Only experts [offset, offset + local) are held; tokens routed elsewhere contribute zero (some tokens
    route nowhere local at all)."""
    h, i, e, k = SHAPES[0]
    inp = moe_inputs(6, h, i, e, k, torch.bfloat16, device, seed=7, num_local=3, expert_offset=2, bias=bias)
    gemm = list(_gemm_cfgs().values())
    cfg = {
        "gemv": _gemv_cfgs()["gemv"],
        "gemm-word": next(c for c in gemm if c["WORD"]),
        "gemm-byte": next(c for c in gemm if not c["WORD"]),
        "grouped": _grouped_cfgs()["grouped"],
    }[mode]
    out = triton_moe.moe_mxfp4_launch(*inp.args(), mode=mode.split("-")[0], cfg=cfg)
    assert_close(out, _reference(inp), f"moe EP {mode}")


def _with_bf16_copies(inp):
    e = inp.experts
    copies = (
        reference.mxfp4_dequantize(e.w13, e.w13_scales, torch.bfloat16),
        reference.mxfp4_dequantize(e.w2, e.w2_scales, torch.bfloat16),
    )
    return dataclasses.replace(inp, experts=dataclasses.replace(e, w13_bf16=copies[0], w2_bf16=copies[1]))


@pytest.mark.parametrize(
    "shape", SHAPES[:2] if INTERPRET else SHAPES[1:], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_moe_grouped_on_bf16_copies(device, shape, skew):
    """moe_config.bf16_experts: the grouped path multiplies the kept bf16 copies (no dequantize) and gives
    the twin's result; with them `auto` takes the grouped path from BF16_MIN_PAIRS on."""
    h, i, e, k = shape
    grouped = triton_moe._INTERPRET_GROUPED if INTERPRET else triton_moe.GROUPED_DEFAULT
    num_tokens = max(grouped["BF16_MIN_PAIRS"] // k, 5)
    inp = _with_bf16_copies(moe_inputs(num_tokens, h, i, e, k, torch.bfloat16, device, seed=e, skew=skew))
    mode, _ = triton_moe.choose_config(num_tokens * k, e, h, i, "auto", True, inp.experts.has_bf16)
    assert mode == "grouped"
    # The copies are what is multiplied: poison the packed blocks, the result stays the twin's.
    ref = _reference(inp)
    inp.experts.w13.zero_()
    inp.experts.w2.zero_()
    out = triton_moe.moe_mxfp4(*inp.args())
    assert_close(out, ref, f"moe grouped on bf16 copies T={num_tokens}")
    below = triton_moe.choose_config(grouped["BF16_MIN_PAIRS"] - 1, e, h, i, "auto", True, True)[0]
    assert below != "grouped"


@pytest.mark.parametrize("backend", ["triton", "grouped"])
def test_moe_backends(device, backend):
    """The op table's entry point with each backend, past the gemv regime."""
    h, i, e, k = SHAPES[1]
    inp = moe_inputs(13, h, i, e, k, torch.bfloat16, device, seed=11)
    out = triton_moe.make_moe_op(backend)(*inp.args())
    assert_close(out, _reference(inp), f"moe backend {backend}")


def test_choose_config_regimes():
    gemv = triton_moe.choose_config(4, 32, 2880, 2880)
    assert gemv[0] == "gemv"
    max_pairs = gemv[1]["MAX_PAIRS"]
    min_pairs = triton_moe.choose_config(max_pairs + 1, 32, 2880, 2880, "auto")
    grouped_min = (triton_moe._INTERPRET_GROUPED if INTERPRET else triton_moe.GROUPED_DEFAULT)["MIN_PAIRS"]
    assert min_pairs[0] == ("grouped" if max_pairs + 1 >= grouped_min else "gemm")
    assert triton_moe.choose_config(1 << 40, 32, 2880, 2880, "auto")[0] == "grouped"
    assert triton_moe.choose_config(1 << 20, 32, 2880, 2880, "triton")[0] == "gemm"
    assert triton_moe.choose_config(max_pairs + 1, 32, 2880, 2880, "grouped")[0] == "grouped"
    # activations the grouped GEMMs cannot take stay on the Triton gemm
    assert triton_moe.choose_config(1 << 20, 32, 2880, 2880, "grouped", grouped_ok=False)[0] == "gemm"
    if not INTERPRET:  # BLOCK_M follows the pairs per expert
        block_m = [
            triton_moe.choose_config(p, 128, 2880, 2880, "triton")[1]["BLOCK_M"]
            for p in (64, 1024, 8192, 16384)
        ]
        assert block_m == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="mode"):
        triton_moe.moe_mxfp4_launch(
            *moe_inputs(1, 64, 64, 8, 4, torch.bfloat16, "cpu").args(), mode="bogus", cfg={}
        )


@pytest.mark.parametrize(
    "experts,rows,cols", [(3, 40, 64), (2, 24, 160)] + ([] if INTERPRET else [(32, 5760, 2880)])
)
def test_mxfp4_dequantize(device, experts, rows, cols):
    g = torch.Generator(device=device).manual_seed(rows)
    blocks, scales = random_mxfp4(experts, rows, cols, g)
    scales[0, 0, 0] = 127  # scale 1
    out = triton_mxfp4.mxfp4_dequantize(blocks, scales, torch.bfloat16)
    ref = reference.mxfp4_dequantize(blocks, scales, torch.bfloat16)
    assert out.shape == (experts, rows, cols) and out.dtype == torch.bfloat16
    assert torch.equal(out, ref), "the dequantize is exact"
    assert triton_mxfp4.mxfp4_dequantize(blocks[:0], scales[:0]).shape == (0, rows, cols)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["gemv", "gemm", "grouped"])
def test_moe_cuda_graph_replay(device, mode):
    """Each regime is capturable and a replay on new routing equals the eager result (no host syncs, no
    shapes taken from data)."""
    h, i, e, k = SHAPES[2]
    num_tokens = 2 if mode == "gemv" else 40
    inp = moe_inputs(num_tokens, h, i, e, k, torch.bfloat16, device, seed=3)
    cfg = next(iter(_cfgs(mode).values()))
    run = lambda: triton_moe.moe_mxfp4_launch(*inp.args(), mode=mode, cfg=cfg)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    new = moe_inputs(num_tokens, h, i, e, k, torch.bfloat16, device, seed=4)
    inp.x.copy_(new.x)
    inp.topk_ids.copy_(new.topk_ids)
    inp.topk_weights.copy_(new.topk_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _reference(inp), f"moe {mode} graph replay")


@pytest.mark.parametrize("block_m", [1, 16])
@pytest.mark.parametrize("num_tokens", [13, 150])
def test_align_pairs(device, block_m, num_tokens):
    """The Triton permutation equals its twin (both deterministic), and the twin keeps the layout's promises:
    each local pair in one slot, each expert's pairs in token order in one padded run, blocks of one expert,
    sentinels everywhere else. 150 tokens spread the pairs over several programs."""
    h, i, e, k = SHAPES[0]
    inp = moe_inputs(
        num_tokens, h, i, e, k, torch.bfloat16, device, seed=3, num_local=5, expert_offset=1, skew=2
    )
    ids = inp.topk_ids.reshape(-1).cpu()
    num_pairs, num_local = ids.numel(), 5
    lay = triton_moe_pairs.align_pairs(inp.topk_ids, 1, num_local, block_m)
    ref = reference.align_pairs(inp.topk_ids, 1, num_local, block_m)
    held = ((ids - 1 >= 0) & (ids - 1 < num_local)).to(device)
    for name in ("slot_pair", "block_expert", "expert_end", "num_padded"):
        assert torch.equal(getattr(lay, name), getattr(ref, name)), name
    assert torch.equal(lay.pair_slot[held], ref.pair_slot[held]) and (ref.pair_slot[~held] == -1).all()
    sp, be, ends = ref.slot_pair.cpu(), ref.block_expert.cpu(), ref.expert_end.cpu()
    total = int(ref.num_padded)
    assert total % block_m == 0 and total <= ref.max_blocks * block_m == sp.numel()
    assert total == int(ends[-1]) and (sp[total:] == num_pairs).all()
    start = 0
    for x in range(num_local):
        run = sp[start : int(ends[x])].tolist()
        want = torch.nonzero(ids - 1 == x).flatten().tolist()
        assert run[: len(want)] == want, f"expert {x}: pairs {run} want {want} in token order"
        assert all(p == num_pairs for p in run[len(want) :]), f"expert {x}: padding is not the sentinel"
        assert len(run) == -(-len(want) // block_m) * block_m
        assert (be[start // block_m : int(ends[x]) // block_m] == x).all()
        start = int(ends[x])
    assert (be[total // block_m :] == num_local).all()
    slots = ref.pair_slot.cpu()
    for p in torch.nonzero(held.cpu()).flatten().tolist():
        assert int(sp[int(slots[p])]) == p


@pytest.mark.parametrize("by_slot", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_combine_pairs(device, by_slot, bias):
    """Each token's top-k rows (directly or through the permutation), + b2, x routing weight, summed; pairs
    of experts not held here add nothing."""
    h, i, e, k = SHAPES[1]
    inp = moe_inputs(9, h, i, e, k, torch.bfloat16, device, seed=5, num_local=4, expert_offset=1, bias=bias)
    num_pairs = inp.topk_ids.numel()
    g = torch.Generator(device=device).manual_seed(6)
    y = torch.randn(num_pairs + 3, h, generator=g, device=device).to(torch.bfloat16)
    slots = None
    if by_slot:
        slots = triton_moe_pairs.align_pairs(inp.topk_ids, 1, 4, 1).pair_slot
    out = triton_moe_pairs.combine_pairs(y, inp.topk_weights, inp.topk_ids, inp.experts, slots, block=32)
    ref = reference.combine_pairs(y, inp.topk_weights, inp.topk_ids, inp.experts, slots)
    assert_close(out, ref, f"combine by_slot={by_slot}", tol=1e-2)
