"""Paged KV cache bookkeeping: one block pool shared by two groups of layers, ref counts, prefix hashes.

Layout. Each KV block holds `block_size` tokens for one layer of each group: full-attention layer j and
sliding-window layer j share the j-th K/V tensors, so a block id means "these tokens, for every layer of the
group that owns the block". A request holds two block tables over the one pool: one for the full layers
(every block of its context) and one for the sliding layers (only the blocks its window can still see;
earlier entries are released and point at the null block 0).

Prefix caching. A full block's identity is a hash chained over its tokens and its parent block's hash.
Computed full blocks are registered under (group, hash); released blocks keep their hash and stay
reusable, in least-recently-used order, until the pool needs them.

Invariant (checked by tests at every step): free + cached + in-use blocks == pool size (block 0 excluded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from osserve.engine.request import Request

FULL, SLIDING = 0, 1
NULL_BLOCK = 0


def hash_block(parent: int | None, tokens: tuple[int, ...] | list[int]) -> int:
    """Chained block hash; stable across processes (CPython hashes tuples of ints deterministically)."""
    return hash((parent if parent is not None else -1, *tokens))


def block_hashes(token_ids: list[int], block_size: int, parent: int | None = None) -> list[int]:
    out = []
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    # (group, hash) while the block is registered in the prefix cache.
    key: tuple[int, int] | None = None
    # Family (parent request id) that registered it, for sharing between n > 1 samples without reuse.
    family: str | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_reuse: bool):
        if num_blocks < 2:
            raise ValueError(f"KV cache: need at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_reuse = enable_reuse
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, least recently released first; cached ones keep their key until evicted.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[tuple[int, int], Block] = {}
        # Blocks in free_queue that still carry a prefix-cache key (kept as a count: read every step).
        self._cached_free = 0

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or cached-and-evictable)."""
        return len(self.free_queue)

    @property
    def num_cached_free(self) -> int:
        return self._cached_free

    @property
    def num_in_use(self) -> int:
        return self.num_usable - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError(f"KV cache: asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            b = self.blocks[bid]
            if b.key is not None:
                self._cached_free -= 1
                self.cached.pop(b.key, None)
                b.key = None
                b.family = None
            b.ref_cnt = 1
            out.append(bid)
        return out

    def touch(self, block_ids: list[int]) -> None:
        for bid in block_ids:
            b = self.blocks[bid]
            if b.ref_cnt == 0:
                self.free_queue.pop(bid)
                self._cached_free -= b.key is not None
            b.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        # Released in reverse order so that a sequence's tail blocks are evicted before its head.
        for bid in reversed(block_ids):
            if bid == NULL_BLOCK:
                continue
            b = self.blocks[bid]
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"KV cache: block {bid} released more often than taken")
            if b.ref_cnt == 0:
                if b.key is not None and not self.enable_reuse:
                    self.cached.pop(b.key, None)
                    b.key = None
                    b.family = None
                self.free_queue[bid] = None
                self._cached_free += b.key is not None

    def register(self, bid: int, group: int, h: int, family: str | None) -> None:
        b = self.blocks[bid]
        # NOTE: only blocks a request holds are registered (never one in the free queue), which keeps
        # the cached-free count exact.
        if b.key is not None or (group, h) in self.cached or b.ref_cnt == 0:
            return
        b.key = (group, h)
        b.family = family
        self.cached[b.key] = b

    def lookup(self, group: int, h: int, family: str | None) -> int | None:
        b = self.cached.get((group, h))
        if b is None:
            return None
        if not self.enable_reuse and (family is None or b.family != family or b.ref_cnt == 0):
            return None
        return b.block_id


@dataclass
class RequestBlocks:
    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)
    # Number of blocks (from the left) already registered in the prefix cache.
    num_registered: int = 0
    # Sliding-table entries before this index are released (null).
    num_released: int = 0
    # The two tables as int32 arrays for the runner, rebuilt only when a table changed (a new block every
    # block_size tokens, a release) rather than converted from the lists at every step.
    _arrays: tuple[tuple[int, int, int, int, int], np.ndarray, np.ndarray] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(full, sliding) block tables as int32 arrays; a missing group reads as the other one."""
        full, sliding = self.full, self.sliding
        key = (id(full), len(full), id(sliding), len(sliding), self.num_released)
        cached = self._arrays
        if cached is None or cached[0] != key:
            f = np.asarray(full, dtype=np.int32) if full else None
            sl = np.asarray(sliding, dtype=np.int32) if sliding else None
            f = (
                f
                if f is not None
                else (np.zeros(len(sliding), dtype=np.int32) if sl is not None else np.zeros(0, np.int32))
            )
            cached = self._arrays = (key, f, sl if sl is not None else f)
        return cached[1], cached[2]


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        sliding_window: int | None,
        has_full_layers: bool = True,
        has_sliding_layers: bool = True,
        enable_reuse: bool = True,
    ):
        self.block_size = block_size
        self.window = sliding_window if has_sliding_layers else None
        self.has_full = has_full_layers
        self.has_sliding = has_sliding_layers
        self.pool = BlockPool(num_blocks, enable_reuse)
        self.reqs: dict[str, RequestBlocks] = {}
        # Prefix-cache statistics, in prompt tokens looked up / found.
        self.query_tokens = 0
        self.hit_tokens = 0
        self.num_hit_requests = 0

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def groups(self) -> list[int]:
        return [g for g, on in ((FULL, self.has_full), (SLIDING, self.has_sliding)) if on]

    def blocks_of(self, request_id: str) -> RequestBlocks:
        return self.reqs[request_id]

    def _first_needed(self, first_query_pos: int) -> int:
        """Index of the first sliding block a query at `first_query_pos` (and later ones) can see."""
        if self.window is None:
            return 0
        return max(0, first_query_pos - self.window + 1) // self.block_size

    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """The hashes of the request's first `num_blocks` full blocks, each computed once per request
        (admission lookups and block registration share them)."""
        hs, bs = req.block_hashes, self.block_size
        if num_blocks > len(hs):
            start = len(hs) * bs
            hs += block_hashes(req.token_ids_slice(start, num_blocks * bs), bs, hs[-1] if hs else None)
        return hs[:num_blocks] if num_blocks < len(hs) else hs

    # -- prefix cache ----------------------------------------------------------------------------------
    def find_cached_prefix(self, req: Request) -> tuple[int, list[int], list[int]]:
        """Longest reusable prefix: (num tokens, full blocks, sliding blocks incl. null entries).

        At least one prompt token is always left to compute, so the step that follows samples a token.
        """
        bs = self.block_size
        family = req.parent_id
        # NOTE: prompt logprobs need every prompt position computed, so such requests skip the cache.
        if req.wants_prompt_logprobs:
            return 0, [], []
        hashes = self._hashes(req, (req.num_tokens - 1) // bs)
        if not hashes:
            return 0, [], []
        full_hits: list[int] = []
        for h in hashes:
            bid = self.pool.lookup(FULL, h, family) if self.has_full else 0
            if bid is None:
                break
            full_hits.append(bid)
        k = len(full_hits) if self.has_full else len(hashes)
        while k > 0 and self.has_sliding:
            first = self._first_needed(k * bs)
            sliding = [self.pool.lookup(SLIDING, h, family) for h in hashes[first:k]]
            if all(b is not None for b in sliding):
                sliding_table = [NULL_BLOCK] * first + sliding  # type: ignore[operator]
                break
            k -= 1
        else:
            sliding_table = []
        if k == 0:
            return 0, [], []
        return k * bs, full_hits[:k] if self.has_full else [], sliding_table

    # -- allocation ------------------------------------------------------------------------------------
    def num_blocks_needed(
        self, req: Request, num_new_tokens: int, cached: tuple[int, list[int], list[int]] | None = None
    ) -> int:
        rb = self.reqs.get(req.request_id) or RequestBlocks()
        computed = req.num_computed_tokens
        full, sliding = rb.full, rb.sliding
        if cached is not None:
            computed, full, sliding = cached
        end = computed + num_new_tokens
        total = -(-end // self.block_size)
        need = 0
        if self.has_full:
            need += max(0, total - len(full))
        if self.has_sliding:
            first = self._first_needed(computed)
            need += max(0, total - max(len(sliding), first))
        return need

    def max_blocks_for(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks one request of `num_tokens` tokens can hold at once (chunks up to `max_chunk`)."""
        full = -(-num_tokens // self.block_size)
        n = full if self.has_full else 0
        if self.has_sliding:
            assert self.window is not None
            n += min(full, -(-(self.window - 1 + max_chunk) // self.block_size) + 1)
        return n

    def max_tokens_per_request(self, max_chunk: int) -> int:
        """Longest request (prompt + output) the whole pool can hold."""
        lo, hi = 0, self.pool.num_usable * self.block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.max_blocks_for(mid, max_chunk) <= self.pool.num_usable:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached: tuple[int, list[int], list[int]] | None = None
    ) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after an optional prefix-cache hit).

        Returns False, changing nothing, when the pool cannot cover it.
        """
        rb = self.reqs.get(req.request_id)
        if rb is None:
            rb = RequestBlocks()
        # Cached blocks may sit in the free queue: touching them first must not be counted as free.
        reclaim = 0
        if cached is not None:
            reclaim = sum(
                1 for b in cached[1] + cached[2] if b != NULL_BLOCK and self.pool.blocks[b].ref_cnt == 0
            )
        need = self.num_blocks_needed(req, num_new_tokens, cached)
        if need + reclaim > self.pool.num_free:
            return False
        if cached is not None:
            num_cached, full, sliding = cached
            self.pool.touch(full)
            self.pool.touch([b for b in sliding if b != NULL_BLOCK])
            rb.full, rb.sliding = list(full), list(sliding)
            rb.num_registered = num_cached // self.block_size
            req.num_computed_tokens = num_cached
            self.query_tokens += req.num_tokens
            self.hit_tokens += num_cached
            self.num_hit_requests += num_cached > 0
        self.reqs[req.request_id] = rb
        computed = req.num_computed_tokens
        total = -(-(computed + num_new_tokens) // self.block_size)
        if self.has_full and total > len(rb.full):
            rb.full += self.pool.allocate(total - len(rb.full))
        if self.has_sliding:
            first = self._first_needed(computed)
            if len(rb.sliding) < first:
                rb.sliding += [NULL_BLOCK] * (first - len(rb.sliding))
            if total > len(rb.sliding):
                rb.sliding += self.pool.allocate(total - len(rb.sliding))
        return True

    def on_computed(self, req: Request) -> None:
        """After a step: register newly filled blocks, release sliding blocks the window left behind."""
        rb = self.reqs.get(req.request_id)
        if rb is None:
            return
        bs = self.block_size
        # Only tokens known on the host can be hashed (a pending token is computed but not yet read back).
        num_full_blocks = min(req.num_computed_tokens, req.num_tokens) // bs
        hashes = self._hashes(req, num_full_blocks)
        for i in range(rb.num_registered, num_full_blocks):
            if self.has_full:
                self.pool.register(rb.full[i], FULL, hashes[i], req.parent_id)
            if self.has_sliding and rb.sliding[i] != NULL_BLOCK:
                self.pool.register(rb.sliding[i], SLIDING, hashes[i], req.parent_id)
        rb.num_registered = max(rb.num_registered, num_full_blocks)
        if self.has_sliding:
            first = min(self._first_needed(req.num_computed_tokens), len(rb.sliding))
            if first > rb.num_released:
                dropped = [b for b in rb.sliding[rb.num_released : first] if b != NULL_BLOCK]
                rb.sliding[rb.num_released : first] = [NULL_BLOCK] * (first - rb.num_released)
                rb.num_released = first
                self.pool.release(dropped)

    def free(self, req: Request) -> None:
        rb = self.reqs.pop(req.request_id, None)
        if rb is None:
            return
        self.pool.release(rb.sliding)
        self.pool.release(rb.full)

    # -- accounting ------------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        p = self.pool
        cached = p.num_cached_free
        return {
            "total": p.num_usable,
            "in_use": p.num_in_use,
            "cached": cached,
            "free": p.num_free - cached,
            "prefix_query_tokens": self.query_tokens,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_hit_requests": self.num_hit_requests,
        }
