"""Process groups of a parallel engine, and the messages its ranks exchange.

Three groups (the first two as vLLM keeps them):
- the device group (the default group: NCCL on GPUs, gloo on CPU) carries the model's collectives and the
  batch tensors rank 0 sends each step;
- the control group (gloo, CPU) carries the per-step control messages (pickled objects, small integer
  exchanges). Its timeout is the model's (OSSERVE_DIST_TIMEOUT_S), so a hung rank fails the step; idle
  workers wait on it between requests, kept alive by rank 0's heartbeat (launcher.Launch);
- the startup group (gloo, CPU, OSSERVE_DIST_STARTUP_TIMEOUT_S) carries the engine config and the
  agreements made while every rank loads its shard, which may take minutes and not equally long.
A rank that dies closes its sockets, which ends any wait on it at once.

The groups are process-wide, like torch.distributed's default group: one parallel engine per process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from osserve.model.batch import ForwardBatch

logger = logging.getLogger(__name__)

# Seconds a collective of the model may wait for a peer before it fails (a hung, not dead, rank).
ENV_TIMEOUT = "OSSERVE_DIST_TIMEOUT_S"
# "nccl" or "gloo"; default: nccl where CUDA is available, else gloo.
ENV_BACKEND = "OSSERVE_DIST_BACKEND"
# Seconds the ranks may wait for each other while they start (loading their shards).
ENV_STARTUP_TIMEOUT = "OSSERVE_DIST_STARTUP_TIMEOUT_S"


def model_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "600")))


def startup_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(ENV_STARTUP_TIMEOUT, "1800")))


def default_backend() -> str:
    backend = os.environ.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{ENV_BACKEND} is {backend!r}; allowed: 'nccl', 'gloo'")
    return backend


@dataclass
class Groups:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    cpu_group: dist.ProcessGroup
    startup_group: dist.ProcessGroup

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_GROUPS: Groups | None = None


def init_groups(
    rank: int, world_size: int, local_rank: int, backend: str, store: dist.Store | None = None
) -> Groups:
    """Join the default (device) group and create the control group. `store` None: env:// rendezvous."""
    global _GROUPS
    if _GROUPS is not None:
        raise RuntimeError(
            "torch.distributed groups are already set up in this process (one parallel engine per process)"
        )
    kwargs: dict = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": model_timeout()}
    if backend == "nccl":
        # NOTE: NVLink multicast (NVLS) stays off; NCCL reads this when the communicator is created.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(**kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=model_timeout())
    startup_group = dist.new_group(backend="gloo", timeout=startup_timeout())
    _GROUPS = Groups(rank, world_size, local_rank, backend, cpu_group, startup_group)
    return _GROUPS


def get_groups() -> Groups:
    if _GROUPS is None:
        raise RuntimeError("torch.distributed groups are not set up (no parallel engine in this process)")
    return _GROUPS


def destroy_groups() -> None:
    global _GROUPS
    if _GROUPS is None:
        return
    _GROUPS = None
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - teardown after a failure must not raise again
        logger.debug("destroy_process_group: %s", e)


# -- control messages (CPU groups) -----------------------------------------------------------------------
def _group(startup: bool) -> dist.ProcessGroup:
    g = get_groups()
    return g.startup_group if startup else g.cpu_group


# Control messages travel in one broadcast of this many bytes (length first); longer ones need a second.
_INLINE_BYTES = 1 << 16


def send_control(message: object, startup: bool = False) -> None:
    """Rank 0: send one picklable message to every other rank."""
    group = _group(startup)
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    head = torch.zeros(_INLINE_BYTES, dtype=torch.uint8)
    head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    first = data[: _INLINE_BYTES - 8]
    head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
    dist.broadcast(head, src=0, group=group)
    if len(data) > len(first):
        rest = torch.frombuffer(bytearray(data[len(first) :]), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=group)


def recv_control(startup: bool = False) -> object:
    """Ranks 1..N-1: wait for rank 0's next message."""
    group = _group(startup)
    head = torch.empty(_INLINE_BYTES, dtype=torch.uint8)
    dist.broadcast(head, src=0, group=group)
    size = int(head[:8].view(torch.int64).item())
    data = head[8 : 8 + size].numpy().tobytes()
    if size > len(data):
        rest = torch.empty(size - len(data), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=group)
        data += rest.numpy().tobytes()
    return pickle.loads(data)


def gather_to_rank0(obj: object, startup: bool = False) -> list[object] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    g = get_groups()
    out: list[object] | None = [None] * g.world_size if g.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_group(startup))
    return out


def all_gather_ints(value: int) -> list[int]:
    g = get_groups()
    out = torch.zeros(g.world_size, dtype=torch.int64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, torch.tensor([value], dtype=torch.int64), group=g.cpu_group)
    return out.tolist()


def min_over_ranks(value: int) -> int:
    """The smallest `value` of all ranks, agreed while they start (e.g. the KV blocks every rank can hold)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_group(startup=True))
    return int(t.item())


# -- a ForwardBatch from rank 0 to the others ------------------------------------------------------------
# The batch goes field by field, whatever fields ForwardBatch has. On CPU everything rides in the control
# message. On GPUs the host fields do, and the tensors are broadcast on the device group, the integer ones
# as one int64 buffer (one NCCL call, no host copy of rank 0's device tensors).


def _transport_dtype(dtype: torch.dtype) -> torch.dtype:
    return (
        torch.int64 if not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool else dtype
    )


def send_batch(batch: ForwardBatch) -> None:
    nccl = get_groups().backend == "nccl"
    values: dict[str, object] = {}
    raw: dict[str, tuple[torch.dtype, tuple[int, ...], bytes, bool]] = {}
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and not (nccl and v.is_cuda):
            # Host tensors (all of them on CPU engines) ride in the message; raw bytes pickle ten times
            # faster than tensors. A host tensor of a GPU engine stays on the host on the workers too.
            data = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            raw[f.name] = (v.dtype, tuple(v.shape), data, nccl)
        elif isinstance(v, torch.Tensor):
            tensors[f.name] = (v.dtype, tuple(v.shape))
            by_dtype.setdefault(_transport_dtype(v.dtype), []).append(
                v.reshape(-1).to(_transport_dtype(v.dtype))
            )
        else:
            values[f.name] = v
    send_control({"op": "forward", "values": values, "raw": raw, "tensors": tensors})
    for parts in by_dtype.values():
        buf = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        if buf.numel():
            dist.broadcast(buf, src=0)


def recv_batch(message: dict, device: torch.device) -> ForwardBatch:
    """The batch announced by a `{"op": "forward"}` control message, on `device`."""
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = message["tensors"]
    by_dtype: dict[torch.dtype, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
    for name, (dtype, shape) in tensors.items():
        by_dtype.setdefault(_transport_dtype(dtype), []).append((name, dtype, shape))
    fields = dict(message["values"])
    for name, (dtype, shape, data, on_host) in message["raw"].items():
        flat = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        t = flat.view(dtype).view(shape)
        fields[name] = t if on_host else t.to(device)
    for transport, entries in by_dtype.items():
        sizes = [math.prod(shape) for _, _, shape in entries]
        buf = torch.empty(sum(sizes), dtype=transport, device=device)
        if buf.numel():
            dist.broadcast(buf, src=0)
        for (name, dtype, shape), part in zip(entries, buf.split(sizes), strict=True):
            fields[name] = part.view(shape).to(dtype)
    return ForwardBatch(**fields)
