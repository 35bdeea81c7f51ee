"""`osserve bench plot`: PNG charts from saved `bench serve` results (matplotlib, Agg backend).

- throughput_vs_interactivity.png: output tokens/s per GPU against output tokens/s per user, one point per
  run (its concurrency written beside it), one line per series.
- latency_vs_concurrency.png: TTFT, TPOT, ITL and E2EL (median and every saved percentile) against
  concurrency. A run without a concurrency cap is placed at its number of prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osserve.bench.aggregate import METRIC_NAMES, METRICS

THROUGHPUT_PNG = "throughput_vs_interactivity.png"
LATENCY_PNG = "latency_vs_concurrency.png"
_PCT_KEY = re.compile(r"^p([0-9.]+)_ttft_ms$")


@dataclass
class Series:
    name: str
    points: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (concurrency, summary)


def load_series(paths: list[str]) -> list[Series]:
    """Result files grouped into series (label, or model + endpoint + workload), each sorted by concurrency."""
    groups: dict[str, Series] = {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            cfg, summary = result["config"], result["summary"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a result of `osserve bench serve --save-result` ({e})") from None
        name = cfg.get("label") or (
            f"{cfg.get('model')} {cfg.get('endpoint')} {cfg.get('dataset_name')} "
            f"in{cfg.get('input_len')}/out{cfg.get('output_len')}"
        )
        if cfg.get("request_rate") is not None:
            name += f" @{cfg['request_rate']:g} req/s"
        conc = cfg.get("max_concurrency") or cfg.get("num_prompts") or summary.get("num_requests") or 1
        groups.setdefault(name, Series(name)).points.append((int(conc), summary))
    for s in groups.values():
        s.points.sort(key=lambda p: p[0])
    return list(groups.values())


def _percentile_stats(series: list[Series]) -> list[str]:
    pcts = {
        float(m.group(1)) for s in series for _, summ in s.points for k in summ if (m := _PCT_KEY.match(k))
    }
    return ["median", *(f"p{p:g}" for p in sorted(pcts) if p != 50)]


def plot_results(paths: list[str], out_dir: str, num_gpus: int = 1, title: str | None = None) -> list[Path]:
    if num_gpus < 1:
        raise ValueError(f"--num-gpus must be at least 1; got {num_gpus}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_series(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(8, 6))
    for i, s in enumerate(series):
        pts = [
            (summ["output_tokens_per_user_per_s"], summ["output_throughput"] / num_gpus, c)
            for c, summ in s.points
            if summ.get("output_tokens_per_user_per_s") is not None
        ]
        if not pts:
            continue
        xs, ys, cs = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color=colors[i % len(colors)], label=s.name)
        for x, y, c in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel(f"output tokens/s per GPU ({num_gpus} GPU{'s' if num_gpus > 1 else ''})")
    ax.set_title(title or "Throughput against interactivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    throughput_png = out / THROUGHPUT_PNG
    fig.savefig(throughput_png, dpi=120)
    plt.close(fig)

    stats = _percentile_stats(series)
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        for i, s in enumerate(series):
            for j, stat in enumerate(stats):
                pts = [(c, summ.get(f"{stat}_{metric}_ms")) for c, summ in s.points]
                pts = [(c, v) for c, v in pts if v is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        styles[j % len(styles)],
                        marker="o",
                        color=colors[i % len(colors)],
                        label=f"{s.name} {stat}" if len(series) > 1 else stat,
                    )
        concs = sorted({c for s in series for c, _ in s.points})
        if len(concs) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(concs, [str(c) for c in concs])
            ax.minorticks_off()
        ax.set_xlabel("max concurrency")
        ax.set_ylabel("ms")
        ax.set_title(METRIC_NAMES[metric])
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title or "Latency against concurrency")
    fig.tight_layout()
    latency_png = out / LATENCY_PNG
    fig.savefig(latency_png, dpi=120)
    plt.close(fig)
    return [throughput_png, latency_png]
