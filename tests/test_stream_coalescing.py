"""Outputs that queue up behind a busy consumer come as one: deltas merged in order, nothing lost, the
finished output last. This is what keeps a server streaming to hundreds of clients from spending a
Python-level SSE event per token per request when it falls behind the engine."""

from __future__ import annotations

import asyncio

import pytest

from osserve.config import EngineConfig
from osserve.engine.async_engine import AsyncEngine
from osserve.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, merge_delta
from osserve.sampling_params import OutputKind, SamplingParams


def _out(tokens: list[int], text: str, finished: bool, first: float | None, lp: float) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=[1, 2],
        prompt_logprobs=None,
        outputs=[
            CompletionOutput(
                0,
                text,
                tokens,
                lp,
                [{t: Logprob(-0.5)} for t in tokens],
                "length" if finished else None,
            )
        ],
        finished=finished,
        metrics=RequestMetrics(0.0, first, 9.0 if finished else None),
        extra={"k": len(tokens)},
    )


def test_merge_delta_concatenates_and_keeps_the_first_token_time() -> None:
    m = merge_delta(_out([5, 6], "ab", False, 1.0, -1.0), _out([7], "c", True, 2.0, -1.5))
    (o,) = m.outputs
    assert (o.token_ids, o.text, o.cumulative_logprob, o.finish_reason) == ([5, 6, 7], "abc", -1.5, "length")
    assert [list(e) for e in o.logprobs] == [[5], [6], [7]]
    assert m.finished and m.metrics.first_token_time == 1.0 and m.metrics.finished_time == 9.0
    assert m.extra == {"k": 1}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = AsyncEngine(
        EngineConfig.from_dict(
            {"model": str(tiny_ckpt), "max_seq_len": 256, "cuda_graph_config": {"max_batch_size": 0}}
        )
    )
    eng.start()
    eng.wait_ready(120)
    yield eng
    eng.shutdown()


def _params(kind: OutputKind) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1, output_kind=kind)


async def _collect(eng: AsyncEngine, rid: str, kind: OutputKind, lag: bool) -> list[RequestOutput]:
    stream = eng.add_request(rid, [3, 14, 15, 92, 65], _params(kind))
    if lag:  # the consumer looks only once the engine is done with the request: all 12 outputs wait
        while await eng.call(lambda core: core.has_unfinished(), 30):
            await asyncio.sleep(0.01)
    return [out async for out in stream]


@pytest.mark.parametrize("kind", [OutputKind.DELTA, OutputKind.CUMULATIVE])
def test_a_lagging_consumer_gets_what_waited_as_one_output(engine, kind: OutputKind) -> None:
    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        return (
            await _collect(engine, f"prompt-{kind.value}", kind, lag=False),
            await _collect(engine, f"lag-{kind.value}", kind, lag=True),
        )

    prompt, lagging = asyncio.run(main())
    assert len(prompt) > 1 and len(lagging) == 1 and lagging[0].finished
    (got,) = lagging[0].outputs
    if kind == OutputKind.DELTA:
        want_ids = [t for o in prompt for t in o.outputs[0].token_ids]
        want_text = "".join(o.outputs[0].text for o in prompt)
        want_lps = [e for o in prompt for e in o.outputs[0].logprobs]
    else:
        last = prompt[-1].outputs[0]
        want_ids, want_text, want_lps = last.token_ids, last.text, last.logprobs
    assert len(want_ids) == 12
    assert got.token_ids == want_ids and got.text == want_text and got.finish_reason == "length"
    assert [list(e) for e in got.logprobs] == [list(e) for e in want_lps]
    assert lagging[0].metrics.first_token_time is not None


def test_progress_log_says_where_step_time_went(caplog) -> None:  # noqa: ANN001
    from osserve.engine.async_engine import ProgressLog

    base = {"num_steps": 0, "num_generated_tokens": 0, "step_seconds": 0.0, "device_wait_seconds": 0.0}
    log = ProgressLog({**base, "num_running": 0, "num_waiting": 0}, interval=0.0)
    log.t -= 2.0  # two seconds of which one was idle
    log.idle = 1.0
    stats = {
        "num_steps": 100,
        "num_generated_tokens": 5000,
        "step_seconds": 0.8,
        "device_wait_seconds": 0.5,
        "num_running": 50,
        "num_waiting": 3,
        "kv": {"in_use": 25, "total": 100},
    }
    with caplog.at_level("INFO", logger="osserve.engine.async_engine"):
        log.maybe_log(stats)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "50 running, 3 waiting, KV 25.0% used" in msg
    # 0.5 s waiting and 0.3 s host over 100 steps; 2 - 0.8 - 1.0 idle = 0.2 s outside step()
    assert "5.00 ms device wait, 3.00 ms host, 2.00 ms outside step()" in msg
    assert log.idle == 0.0 and log.last is stats
