"""Benchmark cases for `python -m osserve.bench.kernels`: shapes, inputs, twins, floors and config variants.

A case builds fresh random inputs, runs a Triton kernel with a given config, runs its reference twin, and
says how many bytes and FLOPs the work needs (for the floor). Kernel modules are imported inside the
builders, so `--smoke` can switch on the Triton interpreter first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Setup:
    device: str = "cuda"
    quick: bool = False
    hidden: int = 2880
    inter: int = 2880
    q_heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    window: int = 128
    block_size: int = 16
    experts: tuple[int, ...] = (32, 128)
    tokens: tuple[int, ...] = (1, 256, 8192)
    # MoE token counts per regime (gpt-oss top-4: pairs = 4 x tokens); 120b (128 experts) runs a subset.
    gemv_tokens: tuple[int, ...] = (1, 2, 4, 8, 16)
    gemm_tokens: tuple[int, ...] = (4, 16, 64, 256, 1024, 2048, 4096, 8192)
    grouped_tokens: tuple[int, ...] = (256, 1024, 2048, 4096, 8192)
    decode: tuple[tuple[str, tuple[int, ...], bool], ...] = (
        # (label, context lengths, sliding)
        ("b1 ctx1k", (1024,), False),
        ("b1 ctx8k", (8192,), False),
        ("b1 ctx32k", (32768,), False),
        ("b1 ctx8k", (8192,), True),
        ("b64 ctx1k", tuple(1024 + 7 * i for i in range(64)), False),
        ("b256 ctx2k", tuple(2048 - 3 * i for i in range(256)), False),
        ("b256 ctx2k", tuple(2048 - 3 * i for i in range(256)), True),
    )
    prefill: tuple[tuple[str, tuple[tuple[int, int], ...], bool], ...] = (
        # (label, (seq_len, query_len) per sequence, sliding)
        ("prompt 2k", ((2048, 2048),), False),
        ("prompt 8k", ((8192, 8192),), False),
        ("prompt 8k", ((8192, 8192),), True),
        ("8x1k prompts", ((1024, 1024),) * 8, False),
        ("chunk 2k after 6k", ((8192, 2048),), False),
        ("2k chunk + 64 decodes", ((3000, 2048),) + tuple((1500 + i, 1) for i in range(64)), False),
    )
    # Largest q x k product checked against the reference (it materializes [heads, q, k] scores).
    max_ref_scores: int = 2048 * 3000


SMOKE = Setup(
    device="cpu",
    quick=True,
    hidden=64,
    inter=96,
    q_heads=4,
    kv_heads=2,
    head_dim=16,
    window=8,
    block_size=4,
    experts=(8,),
    tokens=(3,),
    gemv_tokens=(1,),
    gemm_tokens=(5,),
    grouped_tokens=(5,),
    decode=(("b2", (9, 30), False), ("b2", (9, 30), True)),
    prefill=(("mixed", ((20, 12), (7, 1)), False), ("mixed", ((20, 12), (7, 1)), True)),
)


@dataclass
class Case:
    kernel: str  # tuning-table kernel name
    key: str  # tuning-table shape key
    name: str
    make: Callable[[], Any]  # -> inputs
    run: Callable[[Any, dict], torch.Tensor]  # (inputs, config) -> output
    reference: Callable[[Any], torch.Tensor] | None
    bytes: Callable[[Any], float]
    flops: Callable[[Any], float]
    configs: list[dict]
    tol: float = 2e-2
    # What to time, when it differs from `run` (e.g. without the clones `run` needs for checking).
    timed: Callable[[Any, dict], Any] | None = None
    # Case parameters other passes use (MoE: the gemv / gemm / grouped crossovers).
    params: dict | None = None
    # Inputs to cycle through when timing replays of a CUDA graph (e.g. other experts, so the weights are
    # not L2-resident as they never are in a decode step); None: the inputs themselves.
    graph_inputs: Callable[[Any], list] | None = None


def _variants(default: dict, changes: list[dict], s: Setup, quick: int = 4) -> list[dict]:
    """The default config first, then one variant per change (`quick` configs in all with --quick, one with
    --smoke).

    The lists are hand-picked: every distinct config compiles once per constexpr combination (about a
    second each), so a full grid would not fit a few minutes of GPU time."""
    out = [default]
    for change in changes:
        cfg = dict(default, **change)
        if cfg not in out:
            out.append(cfg)
    return out[: 1 if s.device == "cpu" else quick if s.quick else len(out)]


# ---------------------------------------------------------------------------------------------------------
# Cases


def norm_rope_cases(s: Setup) -> list[Case]:
    from osserve.config import ModelConfig
    from osserve.kernels import reference, triton_norm, triton_rope, triton_router
    from osserve.layers.rope import yarn_inv_freq

    h, hq, hk, d, dev = s.hidden, s.q_heads, s.kv_heads, s.head_dim, s.device
    inv_freq, scaling = yarn_inv_freq(ModelConfig(head_dim=d))
    inv_freq = inv_freq.to(dev)
    cases = []
    for t in s.tokens:

        def make_norm(t=t):
            g = torch.Generator(device=dev).manual_seed(t)
            x = torch.randn(t, h, generator=g, device=dev).to(torch.bfloat16)
            r = torch.randn(t, h, generator=g, device=dev).to(torch.bfloat16)
            return x, r, torch.rand(h, generator=g, device=dev) + 0.5

        warps = _variants(
            triton_norm._default_config(h), [{"num_warps": 4}, {"num_warps": 16}, {"num_warps": 2}], s
        )
        cases.append(
            Case(
                "rms_norm",
                str(h),
                f"add_rms_norm T={t}",
                make_norm,
                lambda a, c: torch.cat(triton_norm._launch(a[0], a[1], a[2], 1e-5, c), -1),
                lambda a: torch.cat(reference.add_rms_norm(a[0], a[1], a[2], 1e-5), -1),
                lambda a: 8 * a[0].numel() + 4 * h,
                lambda a: 0.0,
                warps,
                tol=1e-2,
            )
        )

        def make_rope_kv(t=t):
            g = torch.Generator(device=dev).manual_seed(t)
            qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g, device=dev).to(torch.bfloat16)
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            pos = torch.randint(0, 131072, (t,), generator=g, device=dev)
            nb = t // s.block_size + 8
            cache = torch.zeros(nb, s.block_size, hk, d, device=dev, dtype=torch.bfloat16)
            slots = torch.randperm(nb * s.block_size, device=dev)[:t]
            return q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d), pos, cache, slots

        def run_rope_kv(a, c, fn=triton_rope.rope_write_kv, dtype=None):
            q, k, v, pos, cache, slots = a
            kv = (cache.clone(), cache.clone())
            if dtype is not None:
                q, k = q.to(dtype), k.to(dtype)
            q, k = fn(q, k, v, pos, (inv_freq, scaling), kv, slots)
            return torch.cat([q.flatten(), k.flatten(), kv[0].flatten(), kv[1].flatten()]).float()

        cases.append(
            Case(
                "rope",
                f"d{d}",
                f"rope_write_kv T={t}",
                make_rope_kv,
                run_rope_kv,
                lambda a: run_rope_kv(a, {}, reference.rope_write_kv, torch.float32),
                lambda a: 4 * a[0].shape[0] * (hq + 2 * hk) * d,
                lambda a: 0.0,
                [{}],
                tol=1e-2,
                timed=lambda a, c: triton_rope.rope_write_kv(*a[:4], (inv_freq, scaling), (a[4], a[4]), a[5]),
            )
        )
        for experts in s.experts:

            def make_route(t=t, e=experts):
                g = torch.Generator(device=dev).manual_seed(t)
                rows = torch.rand(t, e, generator=g, device=dev).argsort(1)
                return ((rows.float() - e / 2) / 8).to(torch.bfloat16)

            cases.append(
                Case(
                    "route",
                    f"e{experts}",
                    f"route e{experts} T={t}",
                    make_route,
                    lambda a, c: torch.cat([x.float() for x in triton_router.route(a, 4)], 1),
                    lambda a: torch.cat([x.float() for x in reference.route(a, 4)], 1),
                    lambda a: a.numel() * 2 + a.shape[0] * 4 * 10,
                    lambda a: 0.0,
                    [{}],
                    tol=1e-2,
                )
            )
    return cases


def attention_cases(s: Setup) -> list[Case]:
    from osserve.kernels import reference
    from osserve.kernels import triton_attention as ta
    from osserve.kernels.triton_testing import attention_inputs

    hq, hk, d = s.q_heads, s.kv_heads, s.head_dim

    def make(seqs, window):
        return lambda: attention_inputs(
            list(seqs), hq, hk, d, s.block_size, window, torch.bfloat16, s.device, seed=len(seqs)
        )

    def _keys_per_query(a):
        w, qsl = a.meta.sliding_window, a.meta.query_start_loc_cpu
        for i, n in enumerate(a.meta.seq_lens_cpu):
            qlen = qsl[i + 1] - qsl[i]
            yield n, qlen, w

    def kv_bytes(a):
        keys = sum(min(n, w + q - 1) if w else n for n, q, w in _keys_per_query(a) if q)
        return keys * hk * d * 2 * 2 + 2 * a.q.numel() * 2

    def attn_flops(a):
        total = 0
        for n, qlen, w in _keys_per_query(a):
            for p in range(n - qlen, n):
                total += min(p + 1, w) if w else p + 1
        return 4 * total * hq * d

    def ref(a):
        return reference.paged_attention(*a.args())[: a.num_live_rows]

    def run_decode(a, c):
        return ta._decode(*a.args(), torch.empty_like(a.q), c)[: a.num_live_rows]

    def run_prefill(a, c):
        return ta._prefill(*a.args(), torch.empty_like(a.q), c)[: a.num_live_rows]

    cpu = s.device == "cpu"
    dec_cfgs = _variants(
        ta._INTERPRET_DECODE if cpu else ta.DECODE_DEFAULT,
        [
            {"BLOCK_N": 32},
            {"PROGRAMS_PER_SM": 4},
            {"BLOCK_N": 128, "num_warps": 8},
            {"num_stages": 3},
            {"PROGRAMS_PER_SM": 1},
            {"num_warps": 8},
            {"BLOCK_N": 32, "PROGRAMS_PER_SM": 4},
        ],
        s,
    )
    pre_cfgs = _variants(
        ta._INTERPRET_PREFILL if cpu else ta.PREFILL_DEFAULT,
        [
            {"BLOCK_N": 128},
            {"num_warps": 4},
            {"ROWS": 64, "num_warps": 4},
            {"num_stages": 3},
            {"BLOCK_N": 32},
        ],
        s,
    )
    cases = []
    for label, lens, sliding in s.decode:
        window, kind = (s.window, "sliding") if sliding else (None, "full")
        cases.append(
            Case(
                "attention_decode",
                f"d{d}-{kind}",
                f"decode {label} {kind}",
                make([(n, 1) for n in lens], window),
                run_decode,
                ref,
                kv_bytes,
                attn_flops,
                dec_cfgs,
            )
        )
    for label, seqs, sliding in s.prefill:
        window, kind = (s.window, "sliding") if sliding else (None, "full")
        # NOTE: above max_ref_scores the reference would not fit; those cases check finiteness only (the
        # same kernel and configs are checked on the smaller cases).
        big = sum(q * n for n, q in seqs) > s.max_ref_scores
        cases.append(
            Case(
                "attention_prefill",
                f"d{d}-g{hq // hk}",
                f"prefill {label} {kind}",
                make(seqs, window),
                run_prefill,
                None if big else ref,
                kv_bytes,
                attn_flops,
                pre_cfgs,
            )
        )
    return cases


def _moe_cases(s: Setup) -> list[Case]:
    from osserve.bench.kernel_cases_moe import moe_cases

    return moe_cases(s)


def bitmask_cases(s: Setup) -> list[Case]:
    """Grammar bitmask on the logits (structured outputs): rows of gpt-oss's vocabulary."""
    from osserve.kernels import reference, triton_bitmask

    vocab = 1000 if s.device == "cpu" else 201088
    cases = []
    for rows in (3,) if s.device == "cpu" else (1, 64, 256):

        def make(rows=rows):
            g = torch.Generator(device=s.device).manual_seed(rows)
            logits = torch.randn(rows, vocab, generator=g, device=s.device)
            bits = torch.randint(-(2**31), 2**31 - 1, (rows, -(-vocab // 32)), generator=g, device=s.device)
            return logits, bits.to(torch.int32)

        def run(a, c, fn=triton_bitmask.apply_token_bitmask_):
            out = a[0].clone()
            fn(out, a[1])
            return out.clamp_min(-1e4)  # the checker wants finite values: -inf -> -1e4

        cases.append(
            Case(
                "bitmask",
                "v",
                f"apply_token_bitmask_ rows={rows}",
                make,
                run,
                lambda a: run(a, {}, reference.apply_token_bitmask_),
                lambda a: a[0].numel() * 4 * 1.5 + a[1].numel() * 4,  # read all, write about half
                lambda a: 0.0,
                [{}],
                tol=0.0,
                timed=lambda a, c: triton_bitmask.apply_token_bitmask_(a[0], a[1]),
            )
        )
    return cases


SUITES: dict[str, Callable[[Setup], list[Case]]] = {
    "norm_rope": norm_rope_cases,
    "attention": attention_cases,
    "moe": _moe_cases,
    "bitmask": bitmask_cases,
}
# Share of the sweep budget per suite (what a suite leaves unused passes on to the next). Past its
# deadline a case still runs its default config, so every kernel is checked and timed once.
BUDGET_SHARE = {"norm_rope": 0.05, "attention": 0.2, "moe": 0.74, "bitmask": 0.01}
