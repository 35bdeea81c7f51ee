"""Where this process sits among the parallel ranks, and the collectives the model uses.

One process per rank; `world_size = max(tp_size, ep_size, dp_size)`.
- Attention and the dense layers are sharded over `tp_size` ranks (heads split), which is either the whole
  world or 1 (every rank computes attention whole: replicated, or attention data parallel).
- The experts are split over `ep_size` ranks; each expert's intermediate dimension is further split over
  `moe_tp_size = world_size / ep_size` ranks (TensorRT-LLM's moe_tp x moe_ep = tp rule).
- Attention data parallelism (`dp_size` = world, TensorRT-LLM's DEP): each rank runs attention for its own
  requests; before every MoE the ranks' tokens are gathered, each rank computes its experts for all of them,
  and the partial outputs are reduce-scattered back to the rank that owns each token.
Partial sums are combined with one all-reduce after attention (when sharded) and one after the MoE.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from osserve.config import EngineConfig


@dataclass(frozen=True)
class ParallelConfig:
    rank: int = 0
    tp_size: int = 1
    ep_size: int = 1
    # Attention data parallelism: this many ranks run attention whole, each over its own requests.
    dp_size: int = 1

    def __post_init__(self) -> None:
        world = self.world_size
        for name in ("tp_size", "ep_size", "dp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or world % value:
                raise ValueError(
                    f"parallel: {name} ({value}) must be a positive divisor of the world size ({world})"
                )
        if self.tp_size not in (1, world):
            raise ValueError(
                f"parallel: tensor_parallel_size ({self.tp_size}) must be 1 or the world size ({world}); "
                "attention sharded over a subset of the ranks is not supported"
            )
        if self.dp_size not in (1, world) or (self.dp_size > 1 and self.tp_size != 1):
            raise ValueError(
                f"parallel: attention data parallelism runs attention whole on every rank (tp_size 1, "
                f"dp_size = world size); got tp_size {self.tp_size}, dp_size {self.dp_size}, world {world}"
            )
        if not 0 <= self.rank < world:
            raise ValueError(f"parallel: rank {self.rank} not in [0, {world})")

    @classmethod
    def from_engine_config(cls, config: EngineConfig, rank: int = 0) -> ParallelConfig:
        """The layout an EngineConfig asks for, with TensorRT-LLM's meaning of its three options:
        world = max(tensor_parallel_size, moe_expert_parallel_size); enable_attention_dp turns the
        attention's tensor parallelism into data parallelism over the same ranks."""
        tp, ep = config.tensor_parallel_size, config.moe_expert_parallel_size
        world = max(tp, ep)
        if config.enable_attention_dp and world > 1:
            return cls(rank=rank, tp_size=1, ep_size=ep, dp_size=world)
        return cls(rank=rank, tp_size=tp, ep_size=ep)

    def with_rank(self, rank: int) -> ParallelConfig:
        return ParallelConfig(rank=rank, tp_size=self.tp_size, ep_size=self.ep_size, dp_size=self.dp_size)

    @property
    def world_size(self) -> int:
        return max(self.tp_size, self.ep_size, self.dp_size)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def attention_dp(self) -> bool:
        return self.dp_size > 1

    # Attention / dense sharding.
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    # Expert sharding.
    @property
    def moe_tp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp_size

    @property
    def attention_replicated(self) -> bool:
        """Every rank computes attention whole (tp_size 1 on several ranks): no all-reduce after it."""
        return self.tp_size == 1

    def describe(self) -> str:
        if not self.is_distributed:
            return "1 rank"
        attn = (
            "attention data parallel"
            if self.attention_dp
            else ("attention replicated" if self.tp_size == 1 else f"attention TP{self.tp_size}")
        )
        return f"{self.world_size} ranks: {attn}, experts EP{self.ep_size} x MoE-TP{self.moe_tp_size}"


def split_range(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of part `index` when `total` (a multiple of `unit`) is cut into `parts` nearly equal
    pieces of whole units; earlier parts take the remainder."""
    units = total // unit
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    end = start + base + (1 if index < extra else 0)
    return start * unit, end * unit


def all_reduce(x: torch.Tensor, parallel: ParallelConfig) -> torch.Tensor:
    """Sum over all ranks (in place); a no-op on one rank."""
    if parallel.is_distributed:
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------------------
# Attention data parallelism: the MoE sees the tokens of every rank.


@dataclass
class DPStep:
    """One forward step under attention data parallelism: how many tokens each rank brings."""

    # Real tokens of each rank this step (rows beyond them, e.g. CUDA-graph padding, are not exchanged).
    num_tokens: list[int]
    rank: int
    # Per device: the rows of the gathered [world * pad, H] tensor that hold real tokens.
    _valid_rows: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    @property
    def pad(self) -> int:
        # NOTE: at least one row so that every rank's collectives have the same non-empty shape.
        return max(1, max(self.num_tokens))

    def valid_rows(self, device: torch.device) -> torch.Tensor:
        rows = self._valid_rows.get(device)
        if rows is None:
            idx = [r * self.pad + i for r, n in enumerate(self.num_tokens) for i in range(n)]
            rows = self._valid_rows[device] = torch.tensor(idx, dtype=torch.int64, device=device)
        return rows


_DP_STEP: DPStep | None = None


@contextmanager
def dp_step(num_tokens: list[int], rank: int) -> Iterator[DPStep]:
    """Make `num_tokens` (per rank) the current attention-DP step for the MoE layers; steps do not nest."""
    global _DP_STEP
    if _DP_STEP is not None:
        raise RuntimeError(
            "attention DP: a forward step is already running in this process (steps do not nest)"
        )
    _DP_STEP = step = DPStep(list(num_tokens), rank)
    try:
        yield step
    finally:
        _DP_STEP = None


def _current_step() -> DPStep:
    if _DP_STEP is None:
        raise RuntimeError("attention DP: the MoE ran outside a dp_step (the runner's forward_sync sets it)")
    return _DP_STEP


def _all_gather(out: torch.Tensor, x: torch.Tensor) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x)


def gather_tokens(x: torch.Tensor, parallel: ParallelConfig) -> torch.Tensor:
    """The MoE's input: under attention DP the real tokens of every rank (rank after rank), else `x`."""
    if not parallel.attention_dp:
        return x
    step = _current_step()
    n, pad = step.num_tokens[step.rank], step.pad
    local = x.new_zeros(pad, x.shape[-1])
    local[:n] = x[:n]
    gathered = x.new_empty(parallel.world_size * pad, x.shape[-1])
    _all_gather(gathered, local)
    return gathered[step.valid_rows(x.device)]


def combine_tokens(out: torch.Tensor, like: torch.Tensor, parallel: ParallelConfig) -> torch.Tensor:
    """Sum the MoE's partial outputs over the ranks; under attention DP each rank gets back its own rows
    (shaped as its MoE input `like`, padding rows zero)."""
    if not parallel.attention_dp:
        return all_reduce(out, parallel)
    step = _current_step()
    n, pad = step.num_tokens[step.rank], step.pad
    full = out.new_zeros(parallel.world_size * pad, out.shape[-1])
    full[step.valid_rows(out.device)] = out
    mine = out.new_empty(pad, out.shape[-1])
    _reduce_scatter(mine, full)
    result = torch.zeros_like(like)
    result[:n] = mine[:n]
    return result
