"""Triton RMSNorm, fused add + RMSNorm and RoPE against reference.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from osserve.config import get_preset  # noqa: E402
from osserve.kernels import reference, triton_norm, triton_rope  # noqa: E402
from osserve.kernels.triton_testing import assert_close, poison_cuda_allocator  # noqa: E402
from osserve.layers.rope import yarn_inv_freq  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402

ROWS = [1, 5, 33] if INTERPRET else [1, 7, 128, 4099]
HIDDEN = [64, 96, 100] if INTERPRET else [64, 96, 2880]


def _rand(*shape, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(device, rows, hidden):
    poison_cuda_allocator()
    x = _rand(rows, hidden, device=device) * 3
    w = _rand(hidden, device=device, dtype=torch.float32, seed=1)
    out = triton_norm.rms_norm(x, w, 1e-5)
    assert out.dtype == x.dtype
    assert_close(out, reference.rms_norm(x, w, 1e-5), "rms_norm", tol=1e-2)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_add_rms_norm(device, rows, hidden):
    x = _rand(rows, hidden, device=device)
    res = _rand(rows, hidden, device=device, seed=2) * 10
    w = _rand(hidden, device=device, dtype=torch.float32, seed=1)
    x0, res0 = x.clone(), res.clone()
    out, new_res = triton_norm.add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = reference.add_rms_norm(x, res, w, 1e-5)
    if INTERPRET:
        # NOTE: the interpreter's fp32 -> bf16 cast truncates; a GPU rounds to nearest even as torch does.
        assert_close(new_res, ref_res, "add_rms_norm residual", tol=1e-2)
    else:
        assert torch.equal(new_res, ref_res), "the residual sum must round exactly as the twin's"
    assert_close(out, ref_out, "add_rms_norm", tol=1e-2)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not change"


@pytest.mark.parametrize("preset", ["tiny", "tiny-odd", "gpt-oss-20b"])
@pytest.mark.parametrize("num_tokens", [1, 7] if INTERPRET else [1, 7, 1000])
def test_rope_write_kv(device, preset, num_tokens):
    """q, k and v as strided views of one fused qkv row (as the attention layer passes them); one padding
    token (slot -1) is rotated and never stored."""
    cfg = get_preset(preset)
    inv_freq, scaling = yarn_inv_freq(cfg)
    rope = (inv_freq.to(device), scaling)
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    block_size = 4
    num_blocks = num_tokens // block_size + 3
    qkv = _rand(num_tokens, (hq + 2 * hk) * d, device=device)
    q = qkv[:, : hq * d].view(num_tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(num_tokens, hk, d)
    v = qkv[:, (hq + hk) * d :].view(num_tokens, hk, d)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, cfg.max_position_embeddings, (num_tokens,), generator=g)
    positions[0] = 0
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[-1] = -1
    caches = tuple(_rand(num_blocks, block_size, hk, d, device=device, seed=s) for s in (8, 9))
    want = tuple(c.clone() for c in caches)
    positions, slots = positions.to(device), slots.to(device)
    q_out, k_out = triton_rope.rope_write_kv(q, k, v, positions, rope, caches, slots)
    live = slots >= 0
    q_ref, k_ref = reference.rope(q.float(), k.float(), positions, *rope)
    reference.write_kv(k_ref[live], v[live], *want, slots[live])
    assert_close(q_out, q_ref, "rope_write_kv q", tol=1e-2)
    assert_close(k_out, k_ref, "rope_write_kv k", tol=1e-2)
    assert_close(caches[0], want[0], "rope_write_kv k cache", tol=1e-2)
    assert torch.equal(caches[1], want[1]), "values are copied exactly"
