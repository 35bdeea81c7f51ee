"""The GPU KV transport: CUDA IPC between a prefill and a decode worker on one host.

The source hands out CUDA IPC handles of its KV tensors once (KVServer answers `IpcHandles`); the decode
worker maps them, and each pull then returns only block ids: the decode worker copies those blocks device to
device (NVLink / PCIe peer access) into its reserved blocks, synchronizes, and only then lets the source
release them. Devices are matched by GPU UUID, so each worker may have its own CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import torch

from osserve.distributed.disagg.kv_transfer import KVTransferError, KVTransport, host_id
from osserve.distributed.disagg.protocol import IpcHandles, KVSource
from osserve.engine.engine import EngineCore


class CudaIpcKVTransport(KVTransport):
    """Device-to-device copies from the source's KV pool, mapped into this process through CUDA IPC.

    NOTE: unverified: on the H100 its test ran past 120 s without a result (docs/PERFORMANCE.md, run 9), so
    `kv_transport: auto` does not choose it. Every step is under the transfer timeout, and any failure
    (a timeout included) falls back to the byte transport."""

    name = "cuda_ipc"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pools: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lock = asyncio.Lock()

    def can_fetch(self, source: KVSource) -> bool:
        core = self.engine.core
        return (
            super().can_fetch(source)
            and source.host_id == host_id()
            and core is not None
            and core.runner.device.type == "cuda"
        )

    async def _pool(self, source: KVSource) -> list[tuple[torch.Tensor, torch.Tensor]]:
        async with self._lock:  # one handle exchange per source, however many pulls wait for it
            if source.worker_id not in self._pools:
                self._pools[source.worker_id] = await self._open_pool(source)
            return self._pools[source.worker_id]

    async def _open_pool(self, source: KVSource) -> list[tuple[torch.Tensor, torch.Tensor]]:
        reply, frames = await self.peer(source.kv_address).ask("", IpcHandles(host_id()), self.timeout_s)
        if not reply.ok or len(frames) != 1:
            raise KVTransferError(f"{source.worker_id}: no CUDA IPC handles ({reply.error})")
        data = pickle.loads(bytes(frames[0]))  # noqa: S301 - from a worker of this deployment on this host
        local = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        if data["uuid"] not in local:
            raise KVTransferError(f"{source.worker_id}'s GPU {data['uuid']} is not visible here")
        index = local[data["uuid"]]

        def rebuild(reduced: Any) -> torch.Tensor:
            fn, args = reduced
            args = list(args)
            args[6] = index
            return fn(*args)

        def rebuild_all() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(rebuild(k), rebuild(v)) for k, v in data["handles"]]

        # NOTE: off the event loop and under the transfer timeout: mapping another process's memory is a
        # driver call that must not stall this worker's control plane (run 9 saw this path never finish).
        try:
            return await asyncio.wait_for(asyncio.to_thread(rebuild_all), self.timeout_s)
        except TimeoutError:
            raise KVTransferError(
                f"mapping {source.worker_id}'s KV pool took over {self.timeout_s}s"
            ) from None
        except RuntimeError as e:  # e.g. no peer access between the two GPUs
            raise KVTransferError(f"cannot map {source.worker_id}'s KV pool: {e}") from None

    async def fetch(self, source: KVSource, request_id: str) -> None:
        pool = await self._pool(source)
        reply, _ = await self._pull(source)
        handoff = self.handoff

        def copy(core: EngineCore) -> None:
            if request_id not in handoff.reserved:
                raise KeyError(request_id)
            rb = core.kv.blocks_of(request_id)
            dst_sliding = [b for b in rb.sliding if b != 0]
            if (len(rb.full), len(dst_sliding)) != (len(reply.full_block_ids), len(reply.sliding_block_ids)):
                raise ValueError(
                    f"source holds {len(reply.full_block_ids)} + {len(reply.sliding_block_ids)} blocks, "
                    f"{len(rb.full)} + {len(dst_sliding)} reserved here"
                )
            caches = core.runner.kv_caches
            for layers, src_ids, dst_ids in (
                (handoff.full_layers, reply.full_block_ids, rb.full),
                (handoff.sliding_layers, reply.sliding_block_ids, dst_sliding),
            ):
                if not src_ids:
                    continue
                dev = caches[layers[0]][0].device
                src_idx = torch.tensor(src_ids, dtype=torch.long, device=pool[layers[0]][0].device)
                dst_idx = torch.tensor(dst_ids, dtype=torch.long, device=dev)
                for i in layers:
                    for src, dst in zip(pool[i], caches[i], strict=True):
                        dst.index_copy_(0, dst_idx, src.index_select(0, src_idx).to(dev, non_blocking=True))
            # The source frees its blocks once we say so: the copies must be complete by then.
            torch.cuda.synchronize(core.runner.device)

        try:
            await self.engine.call(copy, self.timeout_s)
        except (ValueError, KeyError, RuntimeError, TimeoutError) as e:
            raise KVTransferError(f"could not copy the KV of {request_id}: {e}") from None

    def close(self) -> None:
        super().close()
        self._pools.clear()
