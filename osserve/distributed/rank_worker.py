"""A worker rank (1..N-1) of a parallel engine: `python -m osserve.distributed.rank_worker`.

Started by the launcher (one host) or by torchrun through `osserve.distributed.run`; everything it needs
comes from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and from rank 0's first
message (the engine config). It loads its own shard with the same `build_engine` as rank 0, then
- under tensor / expert parallelism runs every batch rank 0 sends, in order, through the same
  `ModelRunner.run_model`, and nothing else (rank 0 samples);
- under attention DP runs its own EngineCore in step with the others (data_parallel.serve_rank).
It exits 0 on rank 0's stop message and non-zero when rank 0 goes away.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from osserve.config import EngineConfig
from osserve.distributed import comm
from osserve.parallel import ParallelConfig

logger = logging.getLogger("osserve.worker")


def _watch_parent(parent_pid: int) -> None:
    """A spawned worker whose launcher is gone exits (the launcher cannot clean up after SIGKILL)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _connect(rank: int, world: int, local_rank: int) -> comm.Groups:
    backend = comm.default_backend()
    if os.environ.get("OSSERVE_PARENT_PID"):
        # Spawned by the launcher: tell it this rank is up, then join its store.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=comm.model_timeout(),
        )
        store.set(f"osserve/joined/{rank}", str(os.getpid()))
        return comm.init_groups(rank, world, local_rank, backend, store)
    return comm.init_groups(rank, world, local_rank, backend)


def serve_batches(runner) -> None:
    """Tensor / expert parallelism: run rank 0's batches until it says stop."""
    device = runner.device
    with torch.inference_mode():
        while True:
            msg = comm.recv_control()
            op = msg["op"]  # type: ignore[index]
            if op == "stop":
                return
            if op == "ping":
                continue
            if op != "forward":
                raise RuntimeError(f"worker: unknown message {op!r} from rank 0")
            runner.run_model(comm.recv_batch(msg, device))  # type: ignore[arg-type]


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("OSSERVE_LOG_LEVEL", "WARNING"),
        format="%(asctime)s rank " + os.environ.get("RANK", "?") + " %(levelname)s %(name)s: %(message)s",
    )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if os.environ.get("OSSERVE_PARENT_PID"):
        threading.Thread(
            target=_watch_parent, args=(int(os.environ["OSSERVE_PARENT_PID"]),), daemon=True
        ).start()
    groups = _connect(rank, world, local_rank)
    try:
        setup: dict = comm.recv_control(startup=True)  # type: ignore[assignment]
        config = EngineConfig.from_dict(setup["config"])
        if os.path.isdir(setup["model_path"]):
            # Same host (or a shared file system): the folder rank 0 resolved, no cache lookup here.
            config = config.replace(model=setup["model_path"])
        if groups.backend == "nccl":
            config = config.replace(device=f"cuda:{local_rank}")
        tp, ep, dp = setup["parallel"]
        parallel = ParallelConfig(rank=rank, tp_size=tp, ep_size=ep, dp_size=dp)
        from osserve.distributed.launcher import rank_info
        from osserve.engine.factory import build_engine

        core, _ = build_engine(config, parallel=parallel, progress=False, agree_blocks=comm.min_over_ranks)
        comm.gather_to_rank0(rank_info(core, rank), startup=True)
        if parallel.attention_dp:
            from osserve.distributed.data_parallel import serve_rank

            serve_rank(core)
        else:
            serve_batches(core.runner)
    except Exception as e:  # noqa: BLE001
        # Rank 0 gone (its sockets closed) or a real failure here: either way this rank is done. No group
        # teardown: it could wait on the peer that failed.
        traceback.print_exc()
        print(f"osserve worker rank {rank} stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    comm.destroy_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
