"""Can two processes on this machine move GPU memory device to device? (CUDA IPC, which NIXL's UCX needs for a
READ between two workers on one host.)

1. torch: a parent allocates a CUDA tensor, a spawned child opens it through torch's CUDA IPC handle, sums it.
2. NIXL (`--nixl`): a child registers 1 GiB of VRAM with a NIXL agent (UCX backend), the parent READs it into
   its own registered VRAM three times: GiB/s and whether the bytes arrived. Run it with UCX_LOG_LEVEL=debug
   (and UCX_PROTO_INFO=y) to see which UCX transport served the READ and why others could not.

  python scripts/ipc_probe.py [--nixl] [--mib 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.multiprocessing as mp


def torch_child(q, r) -> None:
    try:
        t = q.get()
        r.put(f"ok: child read sum {float(t.sum()):.0f} on {t.device}")
    except Exception as e:  # noqa: BLE001  (the answer is the error)
        r.put(f"failed: {e!r}")


def nixl_child(nbytes: int, q, r) -> None:
    from osserve.disagg.kv_nixl import import_nixl

    nixl = import_nixl()
    torch.cuda.set_device(0)
    src = (torch.arange(nbytes, device="cuda") % 251).to(torch.uint8)
    agent = nixl.nixl_agent("src", nixl.nixl_agent_config(backends=["UCX"]))
    agent.register_memory([src])
    r.put((agent.get_agent_metadata(), src.data_ptr()))
    q.get()  # until the reader is done


def nixl_read(nbytes: int) -> None:
    from osserve.disagg.kv_nixl import import_nixl

    nixl = import_nixl()
    q, r = mp.Queue(), mp.Queue()
    p = mp.Process(target=nixl_child, args=(nbytes, q, r))
    p.start()
    torch.cuda.set_device(0)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    agent = nixl.nixl_agent("dst", nixl.nixl_agent_config(backends=["UCX"]))
    agent.register_memory([dst])
    meta, addr = r.get(timeout=300)
    name = agent.add_remote_agent(meta)
    local = np.asarray([[dst.data_ptr(), nbytes, 0]], dtype=np.uint64)
    remote = np.asarray([[addr, nbytes, 0]], dtype=np.uint64)
    handle = agent.initialize_xfer(
        "READ", agent.get_xfer_descs(local, "VRAM"), agent.get_xfer_descs(remote, "VRAM"), name
    )
    expect = (torch.arange(nbytes, device="cuda") % 251).to(torch.uint8)
    for i in range(3):
        dst.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        dt = time.perf_counter() - t0
        ok = bool(torch.equal(dst, expect))
        print(
            f"NIXL READ {i}: {nbytes / 2**30:.2f} GiB in {dt * 1e3:.1f} ms = {nbytes / dt / 2**30:.2f} GiB/s, "
            f"state {state}, bytes intact: {ok}"
        )
    agent.release_xfer_handle(handle)
    q.put("done")
    p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nixl", action="store_true", help="also READ between two NIXL agents in two processes")
    ap.add_argument("--mib", type=int, default=1024, help="size of the NIXL READ")
    args = ap.parse_args()
    mp.set_start_method("spawn")
    q, r = mp.Queue(), mp.Queue()
    p = mp.Process(target=torch_child, args=(q, r))
    p.start()
    x = torch.ones(1 << 20, device="cuda")
    q.put(x)
    print("torch CUDA IPC between two processes:", r.get(timeout=120), f"(expected {x.numel()})")
    p.join()
    if args.nixl:
        nixl_read(args.mib << 20)


if __name__ == "__main__":
    main()
