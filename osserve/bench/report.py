"""Printed output of `osserve bench serve`: the figures of one run, and a one-line-per-run sweep table."""

from __future__ import annotations

from typing import Any

from osserve.bench.aggregate import METRIC_NAMES, percentile_key

WIDTH = 60


def _line(label: str, value: Any, fmt: str = "") -> str:
    if value is None:
        shown = "n/a"
    elif fmt:
        shown = format(value, fmt)
    else:
        shown = str(value)
    return f"{label:<44}{shown:>16}"


def format_run(
    summary: dict[str, Any],
    config: dict[str, Any],
    percentile_metrics: list[str],
    percentiles: list[float],
    max_errors: int = 5,
) -> str:
    rate = config["request_rate"]
    lines = [
        " Serving Benchmark Result ".center(WIDTH, "="),
        f"Endpoint: {config['endpoint']}",
        _line("Maximum request concurrency:", config["max_concurrency"] or "unlimited"),
        _line("Request rate configured (req/s):", "inf" if rate == float("inf") else rate),
        _line("Successful requests:", summary["completed"]),
        _line("Failed requests:", summary["failed"]),
        _line("Benchmark duration (s):", summary["duration_s"], ".2f"),
        _line("Total input tokens:", summary["total_input_tokens"]),
        _line("Total generated tokens:", summary["total_output_tokens"]),
        _line("Request throughput (req/s):", summary["request_throughput"], ".2f"),
    ]
    if "request_goodput" in summary:
        lines.append(_line("Request goodput (req/s):", summary["request_goodput"], ".2f"))
    lines += [
        _line("Input token throughput (tok/s):", summary["input_throughput"], ".2f"),
        _line("Output token throughput (tok/s):", summary["output_throughput"], ".2f"),
        _line("Total token throughput (tok/s):", summary["total_token_throughput"], ".2f"),
        _line("Output tokens/s per user (mean):", summary["output_tokens_per_user_per_s"], ".2f"),
    ]
    if summary.get("num_timed_from_first_token"):
        lines.append(
            f"note: {summary['num_timed_from_first_token']} successful requests streamed no visible output "
            "(e.g. only Harmony header tokens): their TTFT / TPOT / ITL are timed from the first generated "
            "token (the server's token counts), not from visible text"
        )
    if summary.get("num_without_output_events"):
        lines.append(
            f"note: {summary['num_without_output_events']} successful requests streamed no visible output "
            "and no token counts (e.g. only Harmony header tokens): no TTFT / TPOT / ITL for them"
        )
    for name in percentile_metrics if summary["completed"] else []:
        upper = name.upper()
        lines.append(f" {METRIC_NAMES[name]} ".center(WIDTH, "-"))
        lines.append(_line(f"Mean {upper} (ms):", summary[f"mean_{name}_ms"], ".2f"))
        lines.append(_line(f"Median {upper} (ms):", summary[f"median_{name}_ms"], ".2f"))
        for p in (p for p in percentiles if p != 50):
            key = percentile_key(p)
            lines.append(_line(f"{key.upper()} {upper} (ms):", summary[f"{key}_{name}_ms"], ".2f"))
    if summary["errors"]:
        lines.append(" Errors ".center(WIDTH, "-"))
        for message, count in list(summary["errors"].items())[:max_errors]:
            lines.append(f"{count:>6} x {message}")
        if len(summary["errors"]) > max_errors:
            lines.append(
                f"       ... and {len(summary['errors']) - max_errors} more kinds (see the saved result)"
            )
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(
    rows: list[tuple[int | None, dict[str, Any]]], percentile_metrics: list[str], percentiles: list[float]
) -> str:
    """One row per run: concurrency, ok / failed, throughputs and the median and highest percentile."""
    top = percentile_key(max(percentiles))
    head = ["conc", "ok", "fail", "req/s", "out tok/s", "tok/s/user"]
    for name in percentile_metrics:
        head += [f"{name} p50", f"{name} {top}"]
    table = [head]
    for conc, s in rows:
        row = [
            "inf" if conc is None else str(conc),
            str(s["completed"]),
            str(s["failed"]),
            _num(s["request_throughput"]),
            _num(s["output_throughput"]),
            _num(s["output_tokens_per_user_per_s"]),
        ]
        for name in percentile_metrics:
            row += [_num(s[f"median_{name}_ms"]), _num(s[f"{top}_{name}_ms"])]
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    out = [" Sweep (latencies in ms) ".center(WIDTH, "=")]
    out += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(out)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
