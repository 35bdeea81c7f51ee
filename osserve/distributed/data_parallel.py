"""Attention data parallelism (TensorRT-LLM's DEP): every rank serves its own requests, with its own
scheduler, KV cache and sampler, and runs attention whole for them; the MoE layers are shared (tokens of
all ranks meet in the experts, see parallel.gather_tokens / combine_tokens).

Rank 0 is the front. DataParallelEngine has EngineCore's interface (add_request, abort, step, ...); it places
each request on the rank with the fewest unfinished ones and drives one global step at a time:
1. when any rank has unfinished requests, rank 0 sends the step message: per rank, the requests added and
   aborted since the last step (idle ranks wait for it; nothing is sent while all are idle);
2. every rank applies its part and steps its own EngineCore. Each forward first shares the ranks' token
   counts; a rank with nothing scheduled runs an idle forward (one padding row, no real token) so that every
   rank runs exactly one forward per step and the MoE collectives line up;
3. every rank's outputs and stats come back to rank 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from osserve.distributed import comm
from osserve.distributed.supervisor import Launch
from osserve.engine.engine import EngineCore
from osserve.engine.outputs import EngineCoreOutputs, concat_outputs
from osserve.model.batch import ForwardBatch, null_block_batch
from osserve.parallel import dp_step
from osserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class StepSync:
    """forward_sync of every attention-DP rank: share token counts, then run the forward inside dp_step."""

    def __init__(self, rank: int, check_ranks: Callable[[], None] | None = None):
        self.rank = rank
        self.num_forwards = 0
        # Rank 0's: raises RankFailedError if a rank failed (the engine loop asks while idle).
        self.check_ranks = check_ranks

    @contextmanager
    def __call__(self, batch: ForwardBatch) -> Iterator[None]:
        counts = comm.all_gather_ints(batch.num_tokens)
        self.num_forwards += 1
        with dp_step(counts, self.rank):
            yield


def idle_batch(runner: Any) -> ForwardBatch:
    """One padding row (num_tokens 0) whose K/V lands in the null block 0, which no real sequence reads."""
    return null_block_batch(
        1, runner.block_size, runner.model_config.sliding_window, runner.device, real=False
    )


def rank_step(core: EngineCore, sync: StepSync, adds: list, aborts: list[int]) -> EngineCoreOutputs:
    """One global step on one rank: apply rank 0's part, step the engine (or idle), report."""
    core.abort(aborts)
    for rid, ids, params, handle in adds:
        try:
            core.add_request(rid, ids, params, handle)
        except ValueError as e:
            core.refuse(handle, str(e))
    before = sync.num_forwards
    outputs = core.step()
    if sync.num_forwards == before:
        core.runner.run_model(idle_batch(core.runner))
    outputs.stats = core.stats()
    return outputs


def serve_rank(core: EngineCore) -> None:
    """A worker rank under attention DP: step with the others until rank 0 says stop."""
    rank = comm.get_groups().rank
    sync = StepSync(rank)
    core.runner.forward_sync = sync
    while True:
        msg: dict = comm.recv_control()  # type: ignore[assignment]
        if msg["op"] == "stop":
            return
        if msg["op"] == "ping":
            continue
        reply = rank_step(core, sync, msg["adds"].get(rank, []), msg["aborts"].get(rank, []))
        comm.gather_to_rank0(reply)


class DataParallelEngine:
    """Rank 0's engine under attention DP: EngineCore's interface over the cores of all ranks."""

    def __init__(self, core: EngineCore, launch: Launch):
        self.local = core
        self.launch = launch
        self.world_size = launch.parallel.world_size
        self.config = core.config
        self.runner = core.runner
        self.kv = core.kv
        self.max_seq_len = core.max_seq_len
        self.vocab_size = core.vocab_size
        self.num_steps = 0
        self.step_s = 0.0  # wall seconds inside step(), every rank's forward included
        self.sync = StepSync(0, launch.check)
        core.runner.forward_sync = self.sync
        # Unfinished requests by first handle: [rank, handles, samples not finished yet].
        self.requests: dict[int, list] = {}
        self.first_of: dict[int, int] = {}  # sample handle -> its request's first handle
        self.load = [0] * self.world_size
        self._adds: list[list] = [[] for _ in range(self.world_size)]
        self._aborts: list[list[int]] = [[] for _ in range(self.world_size)]
        self._errors: list[tuple[int, str]] = []
        self.rank_stats: list[dict[str, Any]] = [core.stats() for _ in range(self.world_size)]

    # -- requests --------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: int
    ) -> None:
        """Queue a request on the least-loaded rank; raises ValueError (naming the field) if it can never
        be served (EngineCore's checks, on rank 0's copy of the limits; should they drift, the rank's own
        check still refuses the request)."""
        self.launch.check()
        if handle in self.requests:
            raise ValueError(f"request {request_id!r}: handle {handle} is already in use")
        self.local.check_request(prompt_token_ids, params)
        rank = min(range(self.world_size), key=lambda r: (self.load[r], r))
        handles = list(range(handle, handle + params.n))
        self.requests[handle] = [rank, handles, params.n]
        for h in handles:
            self.first_of[h] = handle
        self.load[rank] += 1
        self._adds[rank].append((request_id, list(prompt_token_ids), params, handle))

    def refuse(self, handle: int, message: str) -> None:
        self._errors.append((handle, message))

    def abort(self, handles: Sequence[int]) -> None:
        for h in handles:
            first = self.first_of.pop(h, None)
            entry = self.requests.get(first) if first is not None else None
            if entry is None:
                continue
            rank = entry[0]
            pending = [a for a in self._adds[rank] if a[3] == first]
            if pending:
                self._adds[rank].remove(pending[0])
            elif rank == 0:
                self.local.abort([h])
            else:
                # NOTE: the rank that held it frees its blocks at the next step.
                self._aborts[rank].append(h)
            self._done(first, 1)

    def _done(self, first: int, num_samples: int) -> None:
        entry = self.requests.get(first)
        if entry is None:
            return
        entry[2] -= num_samples
        if entry[2] <= 0:
            del self.requests[first]
            self.load[entry[0]] -= 1
            for h in entry[1]:
                self.first_of.pop(h, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._errors)

    # -- the global step -------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        self.launch.check()
        if not self.requests:
            out = EngineCoreOutputs.empty()
            out.errors, self._errors = self._errors, []
            return out
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self.step_s += time.perf_counter() - start

    def _step(self) -> EngineCoreOutputs:
        adds, aborts = self._adds, self._aborts
        self._adds = [[] for _ in range(self.world_size)]
        self._aborts = [[] for _ in range(self.world_size)]
        msg = {
            "op": "step",
            "adds": {r: a for r, a in enumerate(adds) if a and r},
            "aborts": {r: a for r, a in enumerate(aborts) if a and r},
        }
        with self.launch.guard():
            comm.send_control(msg)
            mine = rank_step(self.local, self.sync, adds[0], aborts[0])
            replies: list[EngineCoreOutputs] = comm.gather_to_rank0(mine)  # type: ignore[assignment]
        self.num_steps += 1
        for rank, reply in enumerate(replies):
            self.rank_stats[rank] = reply.stats or {}
            for first, _ in reply.errors:
                entry = self.requests.get(first)
                if entry is not None:
                    self._done(first, entry[2])
            if len(reply):
                for h in reply.handles[reply.finish != 0].tolist():
                    first = self.first_of.pop(h, None)
                    if first is not None:
                        self._done(first, 1)
        out = concat_outputs(replies)
        if self._errors:
            out.errors = out.errors + self._errors
            self._errors = []
        return out

    # -- state -----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        per_rank = self.rank_stats
        kv: dict[str, int] = {}
        for s in per_rank:
            for k, v in s.get("kv", {}).items():
                kv[k] = kv.get(k, 0) + v
        return {
            "num_running": sum(s.get("num_running", 0) for s in per_rank),
            "num_waiting": sum(s.get("num_waiting", 0) for s in per_rank) + sum(map(len, self._adds)),
            "kv": kv,
            "num_steps": self.num_steps,
            "num_preemptions": sum(s.get("num_preemptions", 0) for s in per_rank),
            "num_generated_tokens": sum(s.get("num_generated_tokens", 0) for s in per_rank),
            "step_seconds": self.step_s,
            # Rank 0's own wait for its device; the other ranks' steps run inside the global step.
            "device_wait_seconds": per_rank[0].get("device_wait_seconds", 0.0),
            "requests_per_rank": list(self.load),
        }

    def shutdown(self) -> None:
        self.launch.shutdown()
