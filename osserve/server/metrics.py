"""Prometheus metrics of one server: request counts, token counts, latency histograms, engine gauges.

Each app has its own registry (several servers can live in one test process). Engine gauges (running /
waiting requests, KV blocks, prefix-cache hit rate) are read from the engine's stats at scrape time, and so
are a disaggregated frontend's KV-transfer counters (its workers' sums).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    300.0,
)


# A disaggregated frontend's KV-transfer counters: (key in stats["kv_transfer"], name, help, label).
_KV_TRANSFER = (
    ("fetches", "osserve_kv_transfers", "KV fetches a decode worker completed, by transport.", "transport"),
    ("bytes", "osserve_kv_transfer_bytes", "KV bytes decode workers fetched, by transport.", "transport"),
    (
        "seconds",
        "osserve_kv_transfer_seconds",
        "Seconds of KV fetches (asking the source, moving, writing), by transport.",
        "transport",
    ),
    (
        "move_seconds",
        "osserve_kv_transfer_move_seconds",
        "Seconds the KV bytes took to move (NIXL: READ posted to complete), by transport.",
        "transport",
    ),
    (
        "fallbacks",
        "osserve_kv_transfer_fallbacks",
        "KV fetches that failed or passed their deadline (the prompt was recomputed), by reason.",
        "reason",
    ),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]):
        self._stats = stats
        self._in_flight = in_flight

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        s = self._stats()
        kv = s.get("kv") or {}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge(
            "osserve_num_requests_running", "Requests running in the engine.", s.get("num_running", 0)
        )
        yield gauge(
            "osserve_num_requests_waiting", "Requests waiting for the engine.", s.get("num_waiting", 0)
        )
        yield gauge("osserve_num_requests_in_flight", "Requests the server is serving.", self._in_flight())
        yield gauge("osserve_kv_blocks_in_use", "KV-cache blocks held by requests.", kv.get("in_use", 0))
        yield gauge("osserve_kv_blocks_total", "Usable KV-cache blocks.", kv.get("total", 0))
        yield gauge(
            "osserve_kv_blocks_cached",
            "Free KV-cache blocks that still hold a cached prefix.",
            kv.get("cached", 0),
        )
        query, hit = kv.get("prefix_query_tokens", 0), kv.get("prefix_hit_tokens", 0)
        yield gauge(
            "osserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.", query
        )
        yield gauge("osserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", hit)
        yield gauge(
            "osserve_prefix_cache_hit_rate",
            "Prefix-cache hit tokens over query tokens.",
            hit / query if query else 0.0,
        )
        yield gauge("osserve_engine_steps", "Engine steps run.", s.get("num_steps", 0))
        yield gauge(
            "osserve_engine_generated_tokens", "Tokens the engine sampled.", s.get("num_generated_tokens", 0)
        )
        yield gauge(
            "osserve_engine_step_seconds",
            "Seconds spent in engine steps (host work and waits for the device).",
            s.get("step_seconds", 0.0),
        )
        yield gauge(
            "osserve_engine_device_wait_seconds",
            "Seconds engine steps waited for the device to finish a launched step.",
            s.get("device_wait_seconds", 0.0),
        )
        if "kv_transfer" in s:
            for key, name, doc, label in _KV_TRANSFER:
                family = CounterMetricFamily(name, doc, labels=[label])
                for value, n in sorted(s["kv_transfer"].get(key, {}).items()):
                    family.add_metric([value], n)
                yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "osserve_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("osserve_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.generation_tokens = Counter("osserve_generation_tokens", "Generated tokens.", registry=r)
        self.reasoning_tokens = Counter(
            "osserve_reasoning_tokens", "Generated reasoning (analysis) tokens.", registry=r
        )
        self.finished = Counter(
            "osserve_requests_finished",
            "Generation requests by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.parse_errors = Counter(
            "osserve_harmony_parse_errors", "Model outputs that were not valid Harmony.", registry=r
        )
        self.ttft = Histogram(
            "osserve_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "osserve_time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "osserve_e2e_request_latency_seconds", "Arrival to last token.", buckets=_E2E_BUCKETS, registry=r
        )
        r.register(_EngineCollector(stats, in_flight))

    def observe_request(
        self,
        num_prompt_tokens: int,
        num_output_tokens: int,
        ttft: float | None,
        e2e: float,
        finish_reasons: list[str],
    ) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        self.e2e.observe(e2e)
        for reason in finish_reasons:
            self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
