"""Aggregates of hand-made records, checked against figures worked out by hand."""

from __future__ import annotations

import pytest

from osserve.bench.aggregate import RequestRecord, aggregate, meets_slos, parse_goodput, parse_percentiles
from osserve.bench.report import format_run, format_sweep


def rec(ttft, itl, e2el, out, prompt_tokens=10, success=True, error="", prompt_len=8):
    return RequestRecord(
        session=0,
        turn=0,
        prompt_len=prompt_len,
        output_len=out,
        success=success,
        error=error,
        ttft=ttft,
        itl=list(itl),
        e2el=e2el,
        prompt_tokens=prompt_tokens,
        output_tokens=out if success else None,
    )


RECORDS = [
    rec(0.1, [0.2, 0.2], 0.5, 3),  # TPOT 0.2, decode speed 2 / 0.4 = 5 tok/s
    rec(0.3, [0.1, 0.1, 0.1, 0.1], 0.7, 5),  # TPOT 0.1, 4 / 0.4 = 10 tok/s
    rec(0.2, [], 0.2, 1, prompt_tokens=None),  # one token: no TPOT; input from the requested length (8)
    rec(None, [], 0.4, 4),  # no visible output event: counted, but no TTFT / TPOT
    rec(None, [], None, 6, success=False, error="HTTP 500: boom\ntrace"),
    rec(None, [], None, 6, success=False, error="HTTP 500: boom"),
    rec(None, [], None, 6, success=False, error="connection failed: refused"),
]


def test_aggregate_by_hand():
    s = aggregate(RECORDS, 2.0, [50, 90], {"ttft": 250, "tpot": 150})
    assert (s["num_requests"], s["completed"], s["failed"]) == (7, 4, 3)
    assert s["total_input_tokens"] == 10 + 10 + 8 + 10
    assert s["total_output_tokens"] == 3 + 5 + 1 + 4
    assert s["request_throughput"] == 2.0
    assert (
        s["input_throughput"] == 19.0
        and s["output_throughput"] == 6.5
        and s["total_token_throughput"] == 25.5
    )
    assert s["output_tokens_per_user_per_s"] == pytest.approx(7.5)
    assert s["num_without_output_events"] == 1
    # TTFT over 0.1, 0.3, 0.2 s
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(280)  # linear interpolation between 200 and 300
    assert s["std_ttft_ms"] == pytest.approx((20000 / 3) ** 0.5)
    assert s["mean_tpot_ms"] == pytest.approx(150) and s["p50_tpot_ms"] == pytest.approx(150)
    assert s["mean_itl_ms"] == pytest.approx(800 / 6)  # 0.2, 0.2, 0.1 x 4
    assert s["median_itl_ms"] == pytest.approx(100)
    assert s["mean_e2el_ms"] == pytest.approx(450)  # 0.5, 0.7, 0.2, 0.4
    # goodput: TTFT <= 250 ms and TPOT <= 150 ms -> the 2nd (TTFT 300) fails, the 1st (TPOT 200) fails,
    # the 3rd passes (one token: TPOT 0), the 4th has no TTFT: fails
    assert s["good_requests"] == 1 and s["request_goodput"] == 0.5
    assert s["errors"] == {"HTTP 500: boom": 2, "connection failed: refused": 1}


def test_empty_and_all_failed():
    s = aggregate(RECORDS[4:], 1.0, [99])
    assert s["completed"] == 0 and s["output_throughput"] == 0 and "request_goodput" not in s
    assert all(
        s[f"{stat}_{m}_ms"] is None
        for stat in ("mean", "median", "std", "p99")
        for m in ("ttft", "tpot", "itl", "e2el")
    )
    assert s["output_tokens_per_user_per_s"] is None


def test_slos():
    assert meets_slos(RECORDS[0], {"e2el": 500}) and not meets_slos(RECORDS[0], {"e2el": 499})
    assert meets_slos(RECORDS[2], {"tpot": 0})  # a single token has TPOT 0
    assert not meets_slos(RECORDS[3], {"ttft": 10_000})


def test_goodput_and_percentile_flags():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:2000"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 2000.0,
    }
    assert parse_goodput(None) == {}
    for bad, msg in [
        ("itl:5", "NAME one of ttft, tpot, e2el"),
        ("ttft", "NAME:MS"),
        ("ttft:x", "not a number"),
        ("ttft:-1", "must not be negative"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_goodput([bad])
    assert parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    for bad in ("", "0", "101", "a"):
        with pytest.raises(ValueError, match="metric-percentiles"):
            parse_percentiles(bad)


def test_printed_tables():
    s = aggregate(RECORDS, 2.0, [50, 99], {"ttft": 250})
    text = format_run(
        s,
        {"endpoint": "http://x/v1/completions", "max_concurrency": 4, "request_rate": 2.0},
        ["ttft", "itl"],
        [50, 99],
    )
    assert "Successful requests:" in text and "Failed requests:" in text
    assert "Mean TTFT (ms):" in text and "P99 ITL (ms):" in text and "Mean TPOT" not in text
    assert "Request goodput (req/s):" in text
    assert "     2 x HTTP 500: boom" in text and "1 successful requests streamed no visible output" in text
    table = format_sweep([(1, s), (None, s)], ["ttft"], [50, 99])
    assert "ttft p99" in table.splitlines()[1] and table.splitlines()[3].lstrip().startswith("inf")
