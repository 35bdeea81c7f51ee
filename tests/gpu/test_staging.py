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
