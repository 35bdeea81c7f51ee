"""Per-step inputs reach the device as views of one copy, each 16-byte aligned (Triton specializes kernels on
pointer alignment: a view at an odd offset would compile new kernel variants mid-run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osserve.engine.staging import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_views_are_aligned_and_exact(seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(9):
        dtype = rng.choice([np.int32, np.int64, np.float32, np.bool_])
        n = int(rng.integers(1, 40))
        arrays.append((rng.integers(0, 1000, n) % (2 if dtype == np.bool_ else 1000)).astype(dtype))
    out = to_device(arrays, torch.device("cuda"))
    torch.cuda.synchronize()
    for a, t in zip(arrays, out, strict=True):
        assert t.data_ptr() % 16 == 0
        assert np.array_equal(t.cpu().numpy(), a)


def test_the_ring_reuses_slots_only_after_their_copies():
    from osserve.engine.staging import RING_SLOTS, SLOT_BYTES

    # Queue a long kernel first so that the copies wait behind it while the host keeps refilling slots.
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a / 64
    rng = np.random.default_rng(7)
    sent = [rng.integers(0, 1 << 40, int(rng.integers(1, 5000))) for _ in range(3 * RING_SLOTS)]
    sent.append(rng.integers(0, 1 << 40, SLOT_BYTES // 4))  # larger than a slot: it grows
    got = [to_device([x], torch.device("cuda"))[0] for x in sent]
    torch.cuda.synchronize()
    for x, t in zip(sent, got, strict=True):
        assert np.array_equal(t.cpu().numpy(), x)
