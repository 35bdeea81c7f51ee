"""LLMEngine: an EngineCore and its OutputProcessor in one thread, stepped by the caller.

The synchronous way to drive the engine (the offline `LLM` API, tools, tests): `add_request`, then `step()`
until `has_unfinished()` is false; each step returns the RequestOutputs it completed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from osserve.engine.engine import EngineCore
from osserve.engine.output_processor import OutputProcessor
from osserve.engine.outputs import EngineCoreOutputs, RequestOutput
from osserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, core: Any, tokenizer: Any = None):
        self.core: EngineCore = core
        self.processor = OutputProcessor(tokenizer, core.config.stream_interval)
        self._next_handle = 0
        # Runs after every step, before its outputs are processed (as AsyncEngine.after_step).
        self.after_step: Callable[[EngineCore, EngineCoreOutputs], None] | None = None

    # The parts tests and tools look at.
    @property
    def kv(self) -> Any:
        return self.core.kv

    @property
    def scheduler(self) -> Any:
        return self.core.scheduler

    @property
    def runner(self) -> Any:
        return self.core.runner

    @property
    def config(self) -> Any:
        return self.core.config

    @property
    def max_seq_len(self) -> int:
        return self.core.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never be served."""
        handle = self._next_handle
        state = self.processor.add(request_id, list(prompt_token_ids), params, prompt, handle)
        try:
            self.core.add_request(request_id, prompt_token_ids, params, handle)
        except ValueError:
            self.processor.remove(state)
            raise
        self._next_handle += params.n

    def adopt(
        self,
        request_id: str,
        start: Callable[[EngineCore, int], None],
        params: SamplingParams,
        prompt_token_ids: list[int],
        restore: tuple[list[int], int, float] | None = None,
    ) -> None:
        """AsyncEngine.adopt's twin: `start(core, handle)` puts the request into the core."""
        handle = self._next_handle
        state = self.processor.add(request_id, list(prompt_token_ids), params, None, handle)
        if restore is not None:
            self.processor.restore(state, *restore)
        try:
            start(self.core, handle)
        except ValueError:
            self.processor.remove(state)
            raise
        self._next_handle += params.n

    def abort(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        """Abort requests; their blocks are free when this returns. Returns their final outputs."""
        outs = []
        for rid in request_ids:
            state = self.processor.requests.get(rid)
            if state is None:
                continue
            self.core.abort(state.handles)
            self.processor.abort(state)
            out = self.processor.make_output(state)
            self.processor.remove(state)
            if out is not None:
                outs.append(out)
        return outs

    def has_unfinished(self) -> bool:
        return bool(self.processor.requests) or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outs = self.core.step()
        if self.after_step is not None:
            self.after_step(self.core, outs)
        news = self.processor.process(outs)
        outputs = []
        for state in news:
            out = (
                self.processor.error_output(state)
                if state.error is not None
                else self.processor.make_output(state)
            )
            if state.abort_handles:
                self.core.abort(state.abort_handles)
                state.abort_handles = []
            if out is not None:
                outputs.append(out)
            if state.finished:
                self.processor.remove(state)
        return outputs
