"""Can two processes on this machine share GPU memory? (CUDA IPC, which NIXL's UCX needs for a device-to-device
READ on one host.) A parent allocates a CUDA tensor, a spawned child opens it through torch's CUDA IPC handle
and sums it; then the UCX modules NIXL bundles are listed with what each lacks.

  python scripts/ipc_probe.py
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp


def child(q, r) -> None:
    try:
        t = q.get()
        r.put(f"ok: child read sum {float(t.sum()):.0f} on {t.device}")
    except Exception as e:  # noqa: BLE001  (the answer is the error)
        r.put(f"failed: {e!r}")


def main() -> None:
    mp.set_start_method("spawn")
    q, r = mp.Queue(), mp.Queue()
    p = mp.Process(target=child, args=(q, r))
    p.start()
    x = torch.ones(1 << 20, device="cuda")
    q.put(x)
    print("torch CUDA IPC between two processes:", r.get(timeout=120), f"(expected {x.numel()})")
    p.join()
    for d in sys.path:
        for lib in sorted(glob.glob(os.path.join(d, "nixl_cu13*", "**", "libuct_cuda*.so*"), recursive=True)):
            missing = [
                ln.strip()
                for ln in subprocess.run(["ldd", lib], capture_output=True, text=True).stdout.splitlines()
                if "not found" in ln
            ]
            print("UCX module", lib, "missing:", missing or "nothing")


if __name__ == "__main__":
    main()
