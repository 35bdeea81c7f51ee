"""Which worker gets a request: round-robin, least-loaded, or KV-aware.

KV-aware routing follows NVIDIA Dynamo's KV router: each worker publishes the chained hashes of the prompt
blocks it holds in its prefix cache (osserve/engine/kv_cache.py's `block_hashes`, stable across processes);
a request goes where the prompt blocks it would have to compute, plus a weighted load, cost least.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

ROUTER_MODES = ("round-robin", "least-loaded", "kv")


class Routable(Protocol):
    worker_id: str
    block_size: int
    cached_hashes: set[int]

    @property
    def load(self) -> float:
        """Requests this worker is busy with (sent and not finished, or queued there)."""
        ...


class Router:
    def __init__(self, mode: str = "round-robin", load_weight: float = 1.0):
        if mode not in ROUTER_MODES:
            raise ValueError(f"router_mode is {mode!r}; allowed: {', '.join(ROUTER_MODES)}")
        self.mode = mode
        # KV mode: one queued request costs as much as this many uncached prompt blocks.
        self.load_weight = load_weight
        self._turn = itertools.count()

    def pick(self, workers: Sequence[Routable], prompt_token_ids: list[int], use_kv: bool = True) -> Routable:
        """The worker for this prompt (`workers` must not be empty). `use_kv` False: least-loaded in kv mode
        (decode workers, whose prefix caches the prompt never reaches first)."""
        if not workers:
            raise ValueError("no worker to route to")
        workers = sorted(workers, key=lambda w: w.worker_id)
        turn = next(self._turn)
        if self.mode == "round-robin":
            return workers[turn % len(workers)]
        # Ties go round-robin too, so equal workers share the load.
        order = {w.worker_id: (i - turn) % len(workers) for i, w in enumerate(workers)}
        if self.mode == "least-loaded" or not use_kv:
            return min(workers, key=lambda w: (w.load, order[w.worker_id]))
        # NOTE: imported here so that `osserve --help` (which lists ROUTER_MODES) does not load torch.
        from osserve.engine.kv_cache import block_hashes

        hashes_by_size: dict[int, list[int]] = {}

        def cost(w: Routable) -> tuple[float, int]:
            if w.block_size not in hashes_by_size:
                hashes_by_size[w.block_size] = block_hashes(prompt_token_ids, w.block_size)
            hashes = hashes_by_size[w.block_size]
            cached = overlap(hashes, w.cached_hashes)
            uncached_blocks = -(-len(prompt_token_ids) // w.block_size) - cached
            return uncached_blocks + self.load_weight * w.load, order[w.worker_id]

        return min(workers, key=cost)


def overlap(hashes: list[int], cached: set[int]) -> int:
    """Leading prompt blocks found in `cached` (a chained hash matches only if every earlier block does)."""
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n
