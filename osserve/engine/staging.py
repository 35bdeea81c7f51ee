"""Host -> device copies that never make the host wait for the device.

A copy from ordinary (pageable) host memory is synchronous: it waits until the GPU stream reaches it, i.e.
until the step in flight has finished, which would undo the overlap scheduler. Every per-step input goes
instead through a pinned staging buffer and one non-blocking copy; the device tensors are views of it.

- The staging buffers are a ring allocated once and reused, not fresh pinned tensors: PyTorch's pinned-memory
  cache hands out a new block (cudaHostAlloc, which waits for the device) whenever the blocks of a size are
  still held by copies queued behind the step in flight, which a burst of prefill steps of new sizes does
  every step (docs/PERFORMANCE.md, run 26). A slot is reused only once the copy out of it has run (its
  event; with the ring's length that is steps earlier).
- Each view starts on a 16-byte boundary: Triton specializes a kernel on whether each pointer argument is
  16-byte aligned, so views at varying offsets would compile new variants of the kernels mid-run (about a
  second each; run 26).
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN_BYTES = 16
# Slots of the ring: a step makes 1-4 copies and at most two steps are in flight.
RING_SLOTS = 16
# First size of a slot's buffer (a slot grows, once, for a larger step).
SLOT_BYTES = 1 << 20


class PinnedRing:
    """Pinned host buffers reused in turn; `take(n)` gives a slot of at least n bytes whose last copy is done."""

    def __init__(self, slots: int = RING_SLOTS):
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # type: ignore[union-attr]  (done long ago but for a huge burst)
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            size = max(SLOT_BYTES, 1 << (nbytes - 1).bit_length())
            buf = self.buffers[i] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return i, buf

    def copied(self, i: int) -> None:
        """Mark slot i's copy as queued (on the current stream)."""
        ev = self.events[i] = self.events[i] or torch.cuda.Event()
        ev.record()


_RINGS: dict[torch.device, PinnedRing] = {}


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as tensors on `device`, in order, with one asynchronous copy."""
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    nbytes = [a.nbytes for a in arrays]
    starts = np.cumsum([0] + [-(-n // ALIGN_BYTES) * ALIGN_BYTES for n in nbytes]).tolist()
    ring = _RINGS.setdefault(device, PinnedRing())
    slot, host = ring.take(max(starts[-1], ALIGN_BYTES))
    flat = host.numpy()
    for a, n, at in zip(arrays, nbytes, starts, strict=False):
        flat[at : at + n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    dev = host[: starts[-1]].to(device, non_blocking=True)
    ring.copied(slot)
    return [
        dev[at : at + n].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
        for a, n, at in zip(arrays, nbytes, starts, strict=False)
    ]
