"""Start a parallel engine: this process becomes rank 0, ranks 1..N-1 are worker processes.

`make_engine` lands here when the config asks for more than one rank. Two ways to get the other ranks:
- spawned here (one host): `python -m osserve.distributed.rank_worker` once per rank, rendezvous on a TCPStore
  this process opens on a free port; a monitor thread watches the children;
- started by torchrun (one or more hosts): RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
  environment, env:// rendezvous; rank 0 runs the osserve command, the others the worker
  (`torchrun ... -m osserve.distributed.run serve ...`).
Rank 0 then sends the engine config to the workers, every rank loads its own shard, and the KV cache size
is agreed (the smallest any rank can hold). Under tensor / expert parallelism rank 0 returns a normal
EngineCore whose runner sends each batch to the workers; under attention DP a DataParallelEngine.

Failure: a worker that exits makes the next step (or the start) raise RankFailedError naming the rank and
its exit status; model collectives time out after OSSERVE_DIST_TIMEOUT_S (a hung rank); workers exit when
rank 0 goes away. Nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from osserve.config import EngineConfig, ModelConfig, get_preset
from osserve.distributed import comm
from osserve.distributed.supervisor import (  # noqa: F401 - the launcher's public names
    Launch,
    RankFailedError,
    current_launch,
    describe_exit,
    register,
    shutdown,
)
from osserve.parallel import ParallelConfig

logger = logging.getLogger(__name__)

# Seconds the spawned workers have to start Python, import torch and join (CUDA init included).
ENV_JOIN_TIMEOUT = "OSSERVE_DIST_JOIN_TIMEOUT_S"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def is_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_model(config: EngineConfig) -> tuple[str, ModelConfig]:
    """Where the ranks load the model from (a checkpoint folder, resolved once here, or `random:PRESET`,
    which every rank draws itself) and its shape."""
    from osserve.engine.factory import model_location
    from osserve.model.loader import load_config, parse_random_spec

    spec = parse_random_spec(config.model)
    if spec is not None:
        return config.model, get_preset(spec[0])
    path = model_location(config)[0]
    return str(path), load_config(path)


def check_layout(config: EngineConfig, parallel: ParallelConfig, cfg: ModelConfig) -> None:
    """Reject a layout the model cannot be cut into, before any process starts."""
    if cfg.num_key_value_heads % parallel.tp_size:
        raise ValueError(
            f"tensor_parallel_size ({config.tensor_parallel_size}) must divide num_key_value_heads "
            f"({cfg.num_key_value_heads}); allowed: "
            + ", ".join(
                str(d) for d in range(1, cfg.num_key_value_heads + 1) if cfg.num_key_value_heads % d == 0
            )
        )
    if parallel.ep_size > cfg.num_local_experts:
        raise ValueError(
            f"moe_expert_parallel_size ({parallel.ep_size}) is more than the model's experts ({cfg.num_local_experts})"
        )
    if parallel.moe_tp_size > cfg.intermediate_size // 32:
        raise ValueError(
            f"MoE tensor parallelism of {parallel.moe_tp_size} ranks (world {parallel.world_size} / "
            f"moe_expert_parallel_size {parallel.ep_size}) cuts the intermediate dimension "
            f"({cfg.intermediate_size}) below one 32-block per rank; raise moe_expert_parallel_size"
        )


# -- starting -------------------------------------------------------------------------------------------
def _spawn_workers(
    parallel: ParallelConfig, backend: str, device: torch.device
) -> tuple[dist.TCPStore, dict[int, subprocess.Popen], int | None]:
    world = parallel.world_size
    timeout = float(os.environ.get(ENV_JOIN_TIMEOUT, "300"))
    store = dist.TCPStore(
        "127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=comm.model_timeout()
    )
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        NCCL_NVLS_ENABLE="0",
        OSSERVE_PARENT_PID=str(os.getpid()),
        **{comm.ENV_BACKEND: backend},
        PYTHONPATH=os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p),
    )
    threads = None
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the host's cores instead of each taking all of them.
        threads = max(1, (os.cpu_count() or 1) // world)
        env["OMP_NUM_THREADS"] = str(threads)
    procs: dict[int, subprocess.Popen] = {}
    for rank in range(1, world):
        env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs[rank] = subprocess.Popen([sys.executable, "-m", "osserve.distributed.rank_worker"], env=env_r)
    logger.info(
        "started %d worker processes (pids %s)", len(procs), ", ".join(str(p.pid) for p in procs.values())
    )
    deadline = time.monotonic() + timeout
    waiting = set(procs)
    while waiting:
        for rank in list(waiting):
            rc = procs[rank].poll()
            if rc is not None:
                _stop(procs)
                raise RankFailedError(
                    f"rank {rank} (pid {procs[rank].pid}) {describe_exit(rc)} before joining"
                )
            if store.check([f"osserve/joined/{rank}"]):
                waiting.discard(rank)
        if waiting and time.monotonic() > deadline:
            _stop(procs)
            raise RankFailedError(
                f"ranks {sorted(waiting)} did not join within {timeout:.0f} s (raise {ENV_JOIN_TIMEOUT})"
            )
        time.sleep(0.05)
    return store, procs, threads


def _stop(procs: dict[int, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    for p in procs.values():
        p.wait()


def make_engine(config: EngineConfig, progress: bool = True) -> tuple[Any, str]:
    """An engine for any config, and the model name it serves: built here for one rank, else rank 0 of a
    parallel engine whose other ranks start here (launch_engine)."""
    from osserve.engine.factory import build_engine

    if ParallelConfig.from_engine_config(config).is_distributed:
        return launch_engine(config, progress)
    return build_engine(config, progress=progress)


def launch_engine(config: EngineConfig, progress: bool) -> tuple[Any, str]:
    """Start every rank of the parallel engine `config` asks for; returns rank 0's engine and model name."""
    from osserve.engine.factory import build_engine, resolve_device

    if current_launch() is not None:
        raise RuntimeError("a parallel engine is already running in this process; shut it down first")
    parallel = ParallelConfig.from_engine_config(config)
    model, cfg = resolve_model(config)
    check_layout(config, parallel, cfg)
    device = resolve_device(config)
    backend = os.environ.get(comm.ENV_BACKEND) or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"{comm.ENV_BACKEND}=nccl needs a CUDA device; the engine's device is {device}")
    if parallel.attention_dp and config.cuda_graph_config.max_batch_size:
        # NOTE: attention-DP steps exchange tokens in shapes that change every step; they run eagerly.
        logger.info("attention DP: CUDA graphs off")
        config = config.replace(
            cuda_graph_config=dataclasses.replace(config.cuda_graph_config, max_batch_size=0)
        )
    world = parallel.world_size
    if is_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise ValueError(
                f"torchrun started {size} processes; the config needs {world} ({parallel.describe()})"
            )
        if rank != 0:
            raise RuntimeError(
                "only rank 0 builds the engine; under torchrun use `-m osserve.distributed.run`"
            )
        store, procs, threads = None, {}, None
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        store, procs, threads = _spawn_workers(parallel, backend, device)
        local_rank = 0
    launch = Launch(parallel, procs)
    try:
        with launch.guard():
            comm.init_groups(0, world, local_rank, backend, store)
        if threads is not None:
            launch._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        if backend == "nccl":
            config = config.replace(device=f"cuda:{local_rank}")
        register(launch)
        logger.info("parallel engine: %s", parallel.describe())
        with launch.guard():
            comm.send_control(
                {
                    "config": config.to_dict(),
                    "model_path": model,
                    "parallel": (parallel.tp_size, parallel.ep_size, parallel.dp_size),
                },
                startup=True,
            )
            core, name = build_engine(
                config, parallel=parallel.with_rank(0), progress=progress, agree_blocks=comm.min_over_ranks
            )
            launch.rank_info = comm.gather_to_rank0(rank_info(core, 0), startup=True) or []
        launch.start_heartbeat()
        for info in launch.rank_info:
            logger.info(
                "rank %d on %s: %.2f GiB of weights, %d KV blocks",
                info["rank"],
                info["device"],
                info["param_bytes"] / 2**30,
                info["num_kv_blocks"],
            )
        if parallel.attention_dp:
            from osserve.distributed.data_parallel import DataParallelEngine

            return DataParallelEngine(core, launch), name
        core.runner.forward_sync = BatchSender(launch)
        return core, name
    except BaseException:
        launch.shutdown(graceful=False)
        raise


def rank_info(core: Any, rank: int) -> dict[str, Any]:
    """What one rank holds: its weights (bytes, by parameter name) and KV blocks."""
    model = core.runner.model
    params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    return {
        "rank": rank,
        "pid": os.getpid(),
        "device": str(core.runner.device),
        "param_bytes": sum(params.values()),
        "params": params,
        "num_kv_blocks": core.kv.pool.num_blocks,
    }


class BatchSender:
    """Rank 0's forward_sync under tensor / expert parallelism: every batch goes to the workers first."""

    def __init__(self, launch: Launch):
        self.launch = launch

    def check_ranks(self) -> None:
        """Raise RankFailedError if a rank failed (the engine loop asks while idle)."""
        self.launch.check()

    @contextmanager
    def __call__(self, batch: Any) -> Iterator[None]:
        with self.launch.guard():
            comm.send_batch(batch)
            yield
