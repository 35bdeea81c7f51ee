"""EngineCore (step-by-step serving of many requests) and LLM, the offline API with vLLM's names."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from osserve.config import EngineConfig
from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from osserve.engine.request import Request, RequestStatus
from osserve.engine.runner import ModelRunner, RequestStepResult, StepHandle
from osserve.engine.scheduler import Scheduler
from osserve.sampling_params import OutputKind, SamplingParams
from osserve.structured import GrammarMatcher

logger = logging.getLogger(__name__)

# What a request that neither sampled nor produced prompt logprobs this step reads.
_NO_RESULT = RequestStepResult()


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def detokenizer(self, skip_special_tokens: bool = True) -> Detokenizer: ...


@dataclass
class _Sample:
    req: Request
    detok: Detokenizer | None
    text: str = ""
    # How much of the text / tokens / logprobs the last output already carried (delta outputs).
    sent_text: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Family:
    """One user request: its n samples, each an engine Request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    arrival_time: float = field(default_factory=time.monotonic)
    sent_prompt_logprobs: bool = False
    error: str | None = None

    @property
    def finished(self) -> bool:
        if len(self.samples) == 1:  # the common case, without a generator per call
            return self.samples[0].finish_reason is not None
        return all(s.finish_reason is not None for s in self.samples)


class EngineCore:
    """Owns the scheduler, the KV cache manager and the runner; `step()` advances every request once."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        kv: KVCacheManager,
        max_seq_len: int,
        eos_token_ids: Sequence[int],
        tokenizer: Tokenizer | None = None,
    ):
        self.config = config
        self.runner = runner
        self.kv = kv
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(config, kv, max_seq_len)
        self.families: dict[str, _Family] = {}
        self.vocab_size = runner.vocab_size
        self.num_steps = 0
        self.num_generated = 0  # tokens sampled
        self.step_s = 0.0  # seconds in step(), waits for the device included
        # The launched step whose results are not read yet (overlap scheduling).
        self.inflight: StepHandle | None = None

    # -- requests --------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        """Queue a request; raises ValueError (naming the field) if it can never be served."""
        if request_id in self.families:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = params.check_request(
            len(prompt_token_ids), self.vocab_size, self.max_seq_len, prompt_token_ids
        )
        if not self.config.enable_chunked_prefill and len(prompt_token_ids) > self.config.max_num_tokens:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, beyond max_num_tokens ({self.config.max_num_tokens}) "
                "and enable_chunked_prefill is off"
            )
        need = self.kv.max_blocks_for(len(prompt_token_ids) + max_tokens, self.config.max_num_tokens)
        if need > self.kv.pool.num_usable:
            raise ValueError(
                f"prompt plus max_tokens needs {need} KV blocks, the whole cache holds {self.kv.pool.num_usable}; "
                "lower max_tokens or give the KV cache more memory"
            )
        # Compiled once; the other samples of an n > 1 request copy its fresh state.
        grammar = GrammarMatcher(params.structured) if params.structured is not None else None
        samples = []
        for i in range(params.n):
            req = Request(
                request_id=request_id if params.n == 1 else f"{request_id}-{i}",
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                parent_id=request_id if params.n > 1 else None,
                sample_index=i,
                grammar=grammar.copy() if grammar is not None and i else grammar,
            )
            detok = self.tokenizer.detokenizer(params.skip_special_tokens) if self.tokenizer else None
            samples.append(_Sample(req, detok))
        self.families[request_id] = _Family(request_id, prompt, list(prompt_token_ids), params, samples)
        for s in samples:
            self.scheduler.add(s.req)

    def abort(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        """Abort requests (by the user's id); their blocks are free when this returns."""
        outs = []
        for rid in request_ids:
            fam = self.families.get(rid)
            if fam is None:
                continue
            for s in fam.samples:
                if s.finish_reason is None:
                    self.scheduler.abort(s.req.request_id)
                    s.finish_reason = "abort"
            outs.append(self._output(fam))
            del self.families[rid]
        return outs

    def has_unfinished(self) -> bool:
        # NOTE: a step still in flight when every family has finished holds only wasted work (tokens
        # past a stop); the next step() reads and drops it.
        return bool(self.families)

    # -- the step --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs of the step before it (overlap scheduling)
        or of this one (synchronous)."""
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:
            self.step_s += time.perf_counter() - t0

    def _step(self) -> list[RequestOutput]:
        overlap = not self.config.disable_overlap_scheduler and not self._needs_host_outputs()
        outputs: list[RequestOutput] = []
        if self.inflight is not None and not overlap:
            outputs += self._finish(self.inflight)
            self.inflight = None
        sched = self.scheduler.schedule()
        handle = None
        if not sched.is_empty:
            self.num_steps += 1
            handle = self.runner.launch(sched, self.kv, self.inflight)
            for req, n in sched.scheduled:
                req.num_computed_tokens += n
                req.num_pending += req.request_id in handle.row_of
        # While the device runs the new step, read back and process the previous one.
        if self.inflight is not None:
            outputs += self._finish(self.inflight)
        self.inflight = handle
        if handle is not None and not overlap:
            outputs += self._finish(handle)
            self.inflight = None
        return outputs

    def _needs_host_outputs(self) -> bool:
        """Penalties, logits processors and grammars read the generated tokens on the host: no step may be
        in flight when such a request is scheduled."""
        return any(
            r.sampling_params.needs_penalties or r.sampling_params.logits_processors or r.grammar is not None
            for r in self.scheduler.running
        )

    def _finish(self, handle: StepHandle) -> list[RequestOutput]:
        results = self.runner.collect(handle)
        touched: dict[str, _Family] = {}
        now = time.monotonic()
        for req, _ in handle.sched.scheduled:
            if req.status.is_finished:  # finished or aborted after this step was launched
                continue
            fam = self.families.get(req.parent_id or req.request_id)
            if fam is None:
                continue
            res = results.get(req.request_id, _NO_RESULT)
            if res.prompt_logprobs:
                req.prompt_logprobs += res.prompt_logprobs
            sample = fam.samples[req.sample_index]
            if res.token is not None:
                self.num_generated += 1
                req.num_pending -= 1
                self._append_token(req, sample, res.token, res.logprobs, now)
            self.kv.on_computed(req)
            if sample.finish_reason is not None:
                self.scheduler.finish(req, req.status)
            touched[fam.request_id] = fam
        outputs = []
        for fam in touched.values():
            out = self._output(fam)
            if out is not None:
                outputs.append(out)
            if fam.finished:
                del self.families[fam.request_id]
        return outputs

    def _append_token(
        self, req: Request, sample: _Sample, token: int, logprobs: dict | None, now: float
    ) -> None:
        p = req.sampling_params
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token][0]
        text_before = len(sample.text)
        if sample.detok is not None:
            sample.text += sample.detok.add(token)
        n_out = len(req.output_token_ids)
        status, reason = None, None
        if req.grammar is not None and not req.grammar.accept(token):
            logger.warning(
                "request %s: token %d broke its %s grammar", req.request_id, token, req.grammar.kind
            )
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                status, reason = RequestStatus.FINISHED_STOPPED, token
            elif token in req.eos_token_ids and not p.ignore_eos:
                status, reason = RequestStatus.FINISHED_STOPPED, None
            elif p.stop and sample.detok is not None:
                hit = self._find_stop(sample, p, text_before)
                if hit is not None:
                    status, reason = RequestStatus.FINISHED_STOPPED, hit
        if status is None and req.grammar is not None and req.grammar.done:
            status, reason = RequestStatus.FINISHED_STOPPED, token  # the grammar's end (or a broken one)
        if status is None and (n_out >= req.max_tokens or req.num_tokens >= self.max_seq_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            req.status = status
            req.stop_reason = reason
            sample.finish_reason = status.finish_reason

    @staticmethod
    def _find_stop(sample: _Sample, p: SamplingParams, text_before: int) -> str | None:
        """Find a stop string ending in the newest token's text; cut the text there."""
        assert p.stop
        longest = max(len(s) for s in p.stop)
        start = max(0, text_before - longest + 1)
        best: tuple[int, str] | None = None
        for s in p.stop:
            i = sample.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        sample.text = sample.text[: i + len(s)] if p.include_stop_str_in_output else sample.text[:i]
        return s

    # -- outputs ---------------------------------------------------------------------------------------
    def _output(self, fam: _Family) -> RequestOutput | None:
        p = fam.params
        kind = p.output_kind
        finished = fam.finished
        if kind == OutputKind.FINAL_ONLY and not finished:
            return None
        interval = self.config.stream_interval
        if interval > 1 and not finished:
            new = max(len(s.req.output_token_ids) - s.sent_tokens for s in fam.samples)
            if any(s.sent_tokens for s in fam.samples) and new < interval:
                return None
        outs = []
        # Hold back text that could be the start of a stop string until the request ends.
        holdback = max((len(s) for s in p.stop), default=1) - 1
        for s in fam.samples:
            req = s.req
            done = s.finish_reason is not None
            text_end = len(s.text) if done else max(s.sent_text, len(s.text) - holdback)
            tok_end = len(req.output_token_ids)
            if kind == OutputKind.DELTA:
                text, toks = s.text[s.sent_text : text_end], req.output_token_ids[s.sent_tokens : tok_end]
                lps = req.logprobs[s.sent_tokens : tok_end] if p.logprobs is not None else None
            else:
                text, toks = s.text[:text_end], list(req.output_token_ids)
                lps = req.logprobs if p.logprobs is not None else None
            s.sent_text, s.sent_tokens = text_end, tok_end
            outs.append(
                CompletionOutput(
                    index=req.sample_index,
                    text=text,
                    token_ids=list(toks),
                    cumulative_logprob=req.cumulative_logprob if p.logprobs is not None else None,
                    logprobs=[self._logprobs(e) for e in lps] if lps is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=req.stop_reason,
                )
            )
        first = fam.samples[0].req
        prompt_lps = None
        wants = p.prompt_logprobs is not None and (kind != OutputKind.DELTA or not fam.sent_prompt_logprobs)
        if wants and len(first.prompt_logprobs) >= len(fam.prompt_token_ids):
            prompt_lps = [None if e is None else self._logprobs(e) for e in first.prompt_logprobs]
            fam.sent_prompt_logprobs = True
        first_times = [s.req.first_token_time for s in fam.samples if s.req.first_token_time is not None]
        return RequestOutput(
            request_id=fam.request_id,
            prompt=fam.prompt,
            prompt_token_ids=fam.prompt_token_ids,
            prompt_logprobs=prompt_lps,
            outputs=outs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=fam.arrival_time,
                first_token_time=min(first_times) if first_times else None,
                finished_time=time.monotonic() if finished else None,
            ),
            error=fam.error,
        )

    def _logprobs(self, entry: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        tok = self.tokenizer
        return {
            t: Logprob(lp, rank, tok.decode([t], skip_special_tokens=False) if tok is not None else None)
            for t, (lp, rank) in entry.items()
        }

    # -- state -----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv": self.kv.usage(),
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated,
            "step_seconds": self.step_s,
            "device_wait_seconds": getattr(self.runner, "device_wait_s", 0.0),
            "num_preemptions": self.scheduler.num_preemptions,
        }
