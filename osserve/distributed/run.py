"""Entry point for torchrun: rank 0 runs an osserve command, every other rank serves as a worker.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE --master-addr $HOST0 --master-port 29500 \\
        -m osserve.distributed.run serve --model openai/gpt-oss-120b --tensor-parallel-size 16 ...

Rank 0's engine finds RANK / WORLD_SIZE in the environment and joins the others through env:// instead of
spawning workers; the workers take the engine config from rank 0, so only rank 0's command line matters.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(
            "osserve.distributed.run is for torchrun (RANK / WORLD_SIZE unset); use `osserve` directly",
            file=sys.stderr,
        )
        return 2
    # NOTE: NCCL reads this when its communicators are created; NVLink multicast stays off everywhere.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if int(os.environ["RANK"]) != 0:
        from osserve.distributed.rank_worker import main as worker_main

        return worker_main()
    # Rank 0 becomes the osserve command itself (same environment: its engine finds RANK / WORLD_SIZE).
    os.execv(sys.executable, [sys.executable, "-m", "osserve", *sys.argv[1:]])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
