"""NIXL moves KV device to device between two processes on one GPU: a READ of another process's registered
VRAM is served by UCX's cuda_ipc transport (osserve enables its GET, which UCX leaves off without NVLink),
not emulated through host memory over TCP (0.1-0.6 GiB/s, docs/PERFORMANCE.md run 26)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from osserve.disagg.kv_nixl import import_nixl

NIXL = import_nixl()
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(NIXL is None, reason="needs NIXL (pip install nixl-cu13)"),
]
NBYTES = 512 << 20


def pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, device="cuda") % 251).to(torch.uint8)


def owner(nbytes: int, done, meta) -> None:
    """The source process: registers `nbytes` of VRAM holding `pattern`, hands out its agent's metadata."""
    nixl = import_nixl()
    torch.cuda.set_device(0)
    src = pattern(nbytes)
    torch.cuda.synchronize()
    agent = nixl.nixl_agent("owner", nixl.nixl_agent_config(backends=["UCX"]))
    agent.register_memory([src])
    meta.put((agent.get_agent_metadata(), src.data_ptr()))
    done.get(timeout=300)


def test_read_between_processes_stays_on_the_device():
    ctx = mp.get_context("spawn")
    done, meta = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=owner, args=(NBYTES, done, meta), daemon=True)
    proc.start()
    try:
        torch.cuda.set_device(0)
        dst = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda")
        agent = NIXL.nixl_agent("reader", NIXL.nixl_agent_config(backends=["UCX"]))
        agent.register_memory([dst])
        blob, addr = meta.get(timeout=300)
        name = agent.add_remote_agent(blob)
        local = agent.get_xfer_descs(np.asarray([[dst.data_ptr(), NBYTES, 0]], dtype=np.uint64), "VRAM")
        remote = agent.get_xfer_descs(np.asarray([[addr, NBYTES, 0]], dtype=np.uint64), "VRAM")
        handle = agent.initialize_xfer("READ", local, remote, name)
        rates = []
        for _ in range(3):
            dst.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            rates.append(NBYTES / (time.perf_counter() - t0) / 2**30)
            assert state == "DONE"
            assert torch.equal(dst, pattern(NBYTES))
        handle.release()
        print(
            f"NIXL READ of {NBYTES >> 20} MiB between two processes: {', '.join(f'{r:.1f}' for r in rates)} GiB/s"
        )
        # Host-staged paths reach well under 1 GiB/s here; a copy on the device, hundreds.
        assert max(rates) > 20, f"{rates} GiB/s: the READ went through host memory"
    finally:
        done.put("done")
        proc.join(timeout=60)
