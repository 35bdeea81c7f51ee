"""Host -> device copies that never make the host wait for the device.

A copy from ordinary (pageable) host memory is synchronous: it waits until the GPU stream reaches it, i.e.
until the step in flight has finished, which would undo the overlap scheduler. Every per-step input goes
instead through one pinned buffer per dtype and one non-blocking copy; the device tensors are views of it.
Each view starts on a 16-byte boundary: Triton specializes a kernel on whether each pointer argument is
16-byte aligned, so views at varying offsets would compile new variants of the kernels mid-run (about a
second each; docs/PERFORMANCE.md, run 26).
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN_BYTES = 16


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as tensors on `device`, in order, with one asynchronous copy per distinct dtype."""
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    out: list[torch.Tensor | None] = [None] * len(arrays)
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        sizes = [arrays[i].size for i in idx]
        align = max(1, ALIGN_BYTES // dtype.itemsize)
        starts = np.cumsum([0] + [-(-n // align) * align for n in sizes])
        # NOTE: the caching host allocator keeps a pinned block busy until this copy has run, so a later
        # step can never overwrite it early (and its blocks, like the device's, start 512-byte aligned).
        host = torch.empty(int(starts[-1]), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        flat = host.numpy()
        for i, n, at in zip(idx, sizes, starts.tolist(), strict=False):
            flat[at : at + n] = arrays[i].reshape(-1)
        dev = host.to(device, non_blocking=True)
        for i, n, at in zip(idx, sizes, starts.tolist(), strict=False):
            out[i] = dev[at : at + n].view(arrays[i].shape)
    return out  # type: ignore[return-value]
