"""Per-request records -> the aggregates of one run (throughput, latency statistics, goodput).

Definitions (times in ms in the aggregates, seconds in the records; only successful requests count):
- TTFT: request sent -> first SSE event carrying generated output (content, reasoning or tool-call text).
  A stream that ends without such an event (all its tokens invisible, e.g. Harmony header tokens) is timed
  from its first generated token instead, where the server counts tokens in every chunk (continuous usage):
  TTFT, TPOT and ITL then come from the events that counted new tokens ("num_timed_from_first_token").
  Without that it is successful, and its tokens count, but it has no TTFT, TPOT or ITL
  ("num_without_output_events").
- E2EL: request sent -> the stream's terminal event ([DONE], or response.completed / .incomplete).
- TPOT: per request, (E2EL - TTFT) / (output_tokens - 1), for requests with at least 2 output tokens.
- ITL: the gaps between consecutive output-carrying SSE events, pooled over all requests. An event that
  carries several tokens (stream_interval > 1, speculative decoding) is one gap, as in vLLM's benchmark.
- Output tokens per second per user: mean over requests (>= 2 output tokens) of
  (output_tokens - 1) / (E2EL - TTFT), the decode speed each user sees (the mean of 1 / TPOT).
- Throughputs divide totals by the run's duration (first request sent -> last request done). Token
  counts come from the server's usage (prompt_tokens / completion_tokens); input falls back to the
  requested prompt length where a server reports no usage.
- Goodput: successful requests per second that meet every SLO given (ttft / tpot / e2el, in ms); a request
  with fewer than 2 output tokens has TPOT 0 for this test, one whose TTFT was not measured fails a TTFT or
  TPOT SLO.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass
class RequestRecord:
    """What one request did; saved as is in the result JSON. Times in seconds."""

    session: int  # index of the session (= of the prompt, for single-turn workloads)
    turn: int  # 0-based turn within the session
    prompt_len: int  # requested: Harmony tokens of the user text
    output_len: int  # requested: max_tokens
    start_time: float = 0.0  # when the request was sent, seconds after the run began
    success: bool = False
    error: str = ""
    http_status: int | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens (input_tokens on /v1/responses)
    output_tokens: int | None = None  # the server's usage.completion_tokens (output_tokens on /v1/responses)
    # "usage" (reported by the server) or "tokenizer" (no usage reported: counted from the streamed text)
    output_tokens_source: str = "usage"
    # What ttft / itl time: "output" (events that showed text) or "first_token" (no text showed: the events
    # whose usage counted new tokens)
    timed_from: str = "output"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens or 0
        if self.ttft is None or self.e2el is None or n < 2:
            return None
        return (self.e2el - self.ttft) / (n - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_METRICS)}; got {item!r}"
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] < 0:
            raise ValueError(f"--goodput {item!r}: the SLO must not be negative")
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles takes comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {text!r}")
    return values


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "median": None, "std": None, **{percentile_key(p): None for p in percentiles}}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out: dict[str, float | None] = {
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        "std": float(ms.std()),
    }
    for p in percentiles:
        out[percentile_key(p)] = float(np.percentile(ms, p))
    return out


def aggregate(
    records: list[RequestRecord],
    duration_s: float,
    percentiles: list[float],
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The run's figures (flat keys, vLLM-style names such as mean_ttft_ms, p99_itl_ms)."""
    ok = [r for r in records if r.success]
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens or 0 for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    decode_speeds = [
        (r.output_tokens - 1) / (r.e2el - r.ttft) for r in ok if r.tpot is not None and r.e2el - r.ttft > 0
    ]  # type: ignore[operator]
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "output_tokens_per_user_per_s": float(np.mean(decode_speeds)) if decode_speeds else None,
        "num_without_output_events": sum(1 for r in ok if r.ttft is None),
        "num_timed_from_first_token": sum(1 for r in ok if r.timed_from == "first_token"),
    }
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.e2el for r in ok if r.e2el is not None],
    }
    for name in METRICS:
        for stat, value in _stats(series[name], percentiles).items():
            out[f"{stat}_{name}_ms"] = value
    if goodput:
        good = sum(1 for r in ok if meets_slos(r, goodput))
        out["good_requests"] = good
        out["request_goodput"] = good / dur
    out["errors"] = error_counts(records)
    return out


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    tpot = 0.0 if (r.output_tokens or 0) < 2 else r.tpot
    values = {"ttft": r.ttft, "tpot": tpot, "e2el": r.e2el}
    return all(values[name] is not None and values[name] * 1000 <= limit for name, limit in slos.items())


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """Distinct errors (first line, at most 200 characters) and how often each happened, most frequent first."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error.splitlines() or ["unknown error"])[0][:200]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
