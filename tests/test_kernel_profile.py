"""The step profile's bookkeeping (osserve/bench/kernel_profile.py) on the CPU: kernel families, the bytes and
FLOPs a step needs, the old-against-new comparison."""

from __future__ import annotations

import json

import pytest

from osserve.bench import kernel_profile as kp
from osserve.config import get_preset


@pytest.mark.parametrize(
    "name,family",
    [
        ("_moe_gemv_kernel", "moe"),
        ("_moe_gemm_kernel", "moe"),
        ("_moe_gemv2_kernel", "moe"),  # the kernel's name before the rewrite: old runs compare too
        ("_dequant_kernel", "moe"),
        ("void cutlass::device_kernel<GroupedGemm...>", "moe"),
        ("_decode_kernel", "attention"),
        ("_prefill_kernel", "attention"),
        ("_rope_kernel", "rope+kv"),
        ("_rms_norm_kernel", "norm"),
        ("_route_kernel", "route"),
        ("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "other"),
    ],
)
def test_families(name, family):
    assert kp.family(name) == family


def test_step_work_scales_with_the_step():
    cfg = get_preset("gpt-oss-20b")
    b1 = kp.step_work(cfg, [(1024, 1)])
    b64 = kp.step_work(cfg, [(1024, 1)] * 64)
    prefill = kp.step_work(cfg, [(0, 1024)] * 16)
    # Batch 1 reads 4 experts per layer, 64 tokens touch almost all 32; a prefill step all of them.
    per_expert = 3 * 2880 * 2880 * (0.5 + 1 / 32)
    assert b1["moe"][0] == pytest.approx(24 * 4 * per_expert, rel=0.01)
    assert (
        24 * 31 * per_expert
        < b64["moe"][0]
        < prefill["moe"][0]
        <= 24 * 32.1 * per_expert + 4 * 16384 * 2880 * 48
    )
    assert b64["moe"][1] == 64 * b1["moe"][1]
    # lm_head rows: one per sequence; the dense weights are read once whatever the batch.
    assert b64["gemm"][0] == b1["gemm"][0]
    # Decode attention reads each sequence's keys once: 64x batch 1; causal prefill FLOPs grow with n^2.
    assert b64["attention"][0] == pytest.approx(64 * b1["attention"][0], rel=0.01)
    assert prefill["attention"][1] > 16 * 400 * b1["attention"][1]


def test_compare_prints_ratios():
    def record(step_ms, moe_us):
        fams = {"moe": {"us": moe_us, "pct_ceiling": 50.0}, "gemm": {"us": 100.0, "pct_ceiling": None}}
        return {
            "profile": {"20b decode b64": {"step_ms": step_ms, "families": fams}, "120b": {"error": "oom"}}
        }

    lines: list[str] = []
    kp.compare(json.loads(json.dumps(record(4.0, 900.0))), record(3.0, 450.0), lines.append)
    text = "\n".join(lines)
    assert "20b decode b64" in text and "0.75" in text and "0.50" in text
    assert "120b" not in text  # a case that failed in either run is left out
