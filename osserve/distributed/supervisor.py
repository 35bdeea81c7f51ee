"""Rank 0's watch over the other ranks of a parallel engine: their processes, failures, heartbeat, shutdown.

One `Launch` per parallel engine, registered process-wide (like torch.distributed's default group).
"""

from __future__ import annotations

import atexit
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from osserve.distributed import comm
from osserve.parallel import ParallelConfig

logger = logging.getLogger(__name__)


class RankFailedError(RuntimeError):
    """A rank of a parallel engine died or stopped answering; the engine cannot continue."""


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


class Launch:
    """The processes of one parallel engine, seen from rank 0.

    Rank 0's use of the control group is serialized by `lock`: the engine thread's steps (`guard`) and the
    heartbeat, which pings idle workers so that their wait for the next step never times out while rank
    0 lives, and which notices a worker that stopped answering even while no request runs.
    """

    def __init__(self, parallel: ParallelConfig, procs: dict[int, subprocess.Popen]):
        self.parallel = parallel
        self.procs = procs
        self.failure: str | None = None
        self.rank_info: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        self._stopping = False
        self._last_message = time.monotonic()
        self._threads_before: int | None = None
        if procs:
            threading.Thread(target=self._watch, name="osserve-rank-monitor", daemon=True).start()

    # -- failure ---------------------------------------------------------------------------------------
    def _dead_rank(self) -> str | None:
        for rank, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                return f"rank {rank} (pid {p.pid}) {describe_exit(rc)}"
        return None

    def _fail(self, reason: str) -> str:
        if self.failure is None or reason.startswith("rank"):
            # A rank's death is the root cause of whatever failed before it was seen: it wins.
            self.failure = f"parallel engine stopped: {reason}"
            logger.error("%s; the engine cannot continue", self.failure)
        return self.failure

    def _watch(self) -> None:
        while not self._stopping:
            dead = self._dead_rank()
            if dead is not None and not self._stopping:
                self._fail(dead)
                if comm._GROUPS is not None and comm._GROUPS.backend == "nccl":
                    # NOTE: NCCL would wait for the dead peer until its timeout; aborting the communicators
                    # makes rank 0's pending collectives fail now.
                    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                    if abort is not None:
                        try:
                            abort()
                        except Exception as e:  # noqa: BLE001
                            logger.warning("could not abort the NCCL process group: %s", e)
                return
            time.sleep(0.2)

    def _wait_for_death(self, seconds: float) -> str | None:
        """A collective failed: give a dying child a moment to be reaped, so that the error can name it."""
        deadline = time.monotonic() + seconds
        while self.procs:
            dead = self._dead_rank()
            if dead is not None or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)
        return None

    def check(self) -> None:
        if self.failure is not None:
            raise RankFailedError(self.failure)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run one exchange with the other ranks. Any error inside leaves the ranks out of step, so the
        engine is done: it comes out as RankFailedError naming the dead rank, or the timeout."""
        with self.lock:
            self.check()
            try:
                yield
            except RankFailedError:
                raise
            except Exception as e:
                dead = self._wait_for_death(3.0)
                timeout = comm.model_timeout().total_seconds()
                reason = dead or (
                    f"a step failed on rank 0, or a rank did not answer within {timeout:.0f} s "
                    f"({comm.ENV_TIMEOUT}): {type(e).__name__}: {e}"
                )
                raise RankFailedError(self._fail(reason)) from e
            finally:
                self._last_message = time.monotonic()

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="osserve-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        interval = comm.model_timeout().total_seconds() / 4
        while not self._stopping and self.failure is None:
            time.sleep(min(1.0, interval / 4))
            if time.monotonic() - self._last_message < interval:
                continue
            with self.lock:
                if self._stopping or self.failure is not None:
                    return
                try:
                    comm.send_control({"op": "ping"})
                except Exception as e:  # noqa: BLE001
                    dead = self._wait_for_death(3.0)
                    self._fail(
                        dead or f"a worker did not answer the heartbeat within {4 * interval:.0f} s: {e}"
                    )
                    return
                self._last_message = time.monotonic()

    # -- shutdown --------------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True, destroy_groups: bool = True) -> None:
        """Stop the workers (asking first when `graceful`), then tear the groups down."""
        if self._stopping:
            return
        self._stopping = True
        if graceful and self.failure is None and comm._GROUPS is not None and self.lock.acquire(timeout=5):
            try:
                comm.send_control({"op": "stop"})
            except Exception as e:  # noqa: BLE001 - a worker may already be gone
                logger.debug("stop message: %s", e)
            finally:
                self.lock.release()
        deadline = time.monotonic() + (10.0 if graceful else 0.0)
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if destroy_groups:
            comm.destroy_groups()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        global _LAUNCH
        if _LAUNCH is self:
            _LAUNCH = None


_LAUNCH: Launch | None = None


def current_launch() -> Launch | None:
    return _LAUNCH


def register(launch: Launch) -> None:
    global _LAUNCH
    if _LAUNCH is not None and _LAUNCH is not launch:
        raise RuntimeError("a parallel engine is already running in this process; shut it down first")
    _LAUNCH = launch


def shutdown() -> None:
    """Stop this process's parallel engine, if any (workers exit, groups are destroyed)."""
    if _LAUNCH is not None:
        _LAUNCH.shutdown(graceful=True)


def _shutdown_at_exit() -> None:
    # NOTE: another thread may be inside a collective at interpreter exit: stop the children, touch no group.
    if _LAUNCH is not None:
        _LAUNCH.shutdown(graceful=False, destroy_groups=False)


atexit.register(_shutdown_at_exit)
