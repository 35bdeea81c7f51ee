"""`osserve bench host`: the engine with a stand-in model, in its own process, outputs over the real
transport to the real output processor; it must report a host cost per sequence per step."""

from __future__ import annotations

import argparse
import json

import pytest

from osserve.bench import host


@pytest.mark.slow  # one of the longest: pytest -m "not slow" stays under 3 minutes
@pytest.mark.parametrize("engine_process", ["true", "false"])
def test_bench_host_measures_steps_and_host_cost(engine_process, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "host.json"
    args = argparse.Namespace(
        sizes="3,6",
        preset="tiny",
        prompt_len=20,
        window=0.5,
        warmup_steps=3,
        engine_process=engine_process,
        save_result=str(out),
    )
    results = host.run(args)
    assert [r["running"] for r in results] == [3, 6]
    for r in results:
        assert r["steps"] > 0 and r["steps_per_s"] > 0
        assert 0 < r["in_step_us_per_seq_step"] <= r["host_us_per_seq_step"]
        # Every running request decodes one token per step, and the consumers got them.
        assert r["generated_tok_per_s"] == pytest.approx(r["running"] * r["steps_per_s"], rel=0.2)
        assert r["delivered_tok_per_s"] > 0
    assert json.loads(out.read_text())["results"][1]["running"] == 6
    printed = capsys.readouterr().out
    assert (
        "host us/seq/step" in printed
        and ("engine process" if engine_process == "true" else "engine thread") in printed
    )


def test_standin_model_spec_gives_a_model_without_compute() -> None:
    from osserve.model.standin import StandInModel, parse_standin_spec

    assert parse_standin_spec("standin:gpt-oss-120b") == "gpt-oss-120b"
    assert parse_standin_spec("random:tiny") is None
    import torch

    m = StandInModel("tiny", torch.float32)
    logits = m.compute_logits(torch.tensor([[0.0], [1.0], [2.0]]))
    assert logits.argmax(-1).tolist() == [32 + 3, 32 + 10, 32 + 17]
