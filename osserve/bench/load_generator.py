"""`osserve bench serve`: a load generator for any OpenAI-compatible server.

Sessions (one request each, or several chat turns) arrive at --request-rate (Poisson, or gamma with
--burstiness) and at most --max-concurrency run at a time; every request streams, and its timings and the
server's usage are kept in a `RequestRecord`. A comma list of concurrencies is a sweep: one run (and one
result file) per value, each with fresh prompts so that no run hits the prefix cache of an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from osserve.bench import datasets
from osserve.bench.aggregate import METRICS, RequestRecord, aggregate
from osserve.bench.datasets import Session
from osserve.bench.endpoints import ENDPOINTS, RequestSpec, endpoint_kind, send_request
from osserve.bench.report import format_run, format_sweep

RESULT_SCHEMA = "osserve.bench.serve/1"


@dataclass(frozen=True)
class ServeConfig:
    """Everything a sweep needs; saved in each result file's "config"."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "chat"  # chat | completions | responses (or their paths)
    model: str | None = None  # None: the first model of GET /v1/models
    label: str | None = None
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    num_prompts_per_concurrency: int | None = None  # if set: num_prompts = this x concurrency, per run
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_turns: int = 3  # multi-turn: user turns per session
    shuffle: bool = True
    max_concurrency: tuple[int | None, ...] = (None,)
    request_rate: float = math.inf
    burstiness: float = 1.0
    num_warmups: int = 0
    seed: int = 0
    ignore_eos: bool = True
    continuous_usage: bool = True
    temperature: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout: float = 3600.0
    ready_check_timeout: float = 0.0  # seconds to wait for GET /health to answer 200 before starting
    percentile_metrics: tuple[str, ...] = METRICS
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    goodput: dict[str, float] = field(default_factory=dict)
    save_result: bool = False
    result_dir: str = "."
    result_filename: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        object.__setattr__(self, "endpoint", endpoint_kind(self.endpoint))
        if self.dataset_name not in datasets.DATASETS:
            raise ValueError(
                f"--dataset-name must be one of {', '.join(datasets.DATASETS)}; got {self.dataset_name!r}"
            )
        if self.dataset_name == "jsonl" and not self.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path FILE.jsonl")
        if self.dataset_name == "multi-turn" and self.endpoint == "completions":
            raise ValueError("--dataset-name multi-turn sends chat history: use --endpoint chat or responses")
        checks = [
            ("num_prompts", self.num_prompts >= 1, "at least 1"),
            ("num_prompts_per_concurrency", (self.num_prompts_per_concurrency or 1) >= 1, "at least 1"),
            ("random_input_len", self.input_len >= 0, "at least 0"),
            ("random_output_len", self.output_len >= 1, "at least 1"),
            ("random_prefix_len", self.prefix_len >= 0, "at least 0"),
            ("random_range_ratio", 0.0 <= self.range_ratio < 1.0, "in [0, 1)"),
            ("multi_turn_num_turns", self.num_turns >= 1, "at least 1"),
            ("max_concurrency", all(c is None or c >= 1 for c in self.max_concurrency), "at least 1"),
            ("request_rate", self.request_rate > 0, "positive (inf: all at once)"),
            ("burstiness", self.burstiness > 0, "positive"),
            ("num_warmups", self.num_warmups >= 0, "at least 0"),
            ("request_timeout", self.request_timeout > 0, "positive"),
            ("ready_check_timeout", self.ready_check_timeout >= 0, "at least 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be {allowed}; got {getattr(self, name, None)}"
                )
        if self.dataset_name == "random" and self.input_len + self.prefix_len < 1:
            raise ValueError("--random-input-len + --random-prefix-len must be at least 1")
        bad = [m for m in self.percentile_metrics if m not in METRICS]
        if bad:
            raise ValueError(f"--percentile-metrics: unknown {bad}; allowed: {', '.join(METRICS)}")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    def num_prompts_for(self, concurrency: int | None) -> int:
        if self.num_prompts_per_concurrency and concurrency:
            return self.num_prompts_per_concurrency * concurrency
        return self.num_prompts


def normalize_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://; got {url!r}")
    return url.removesuffix("/v1")


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times (seconds after the first) of n arrivals: gaps ~ Gamma(shape=burstiness, mean=1/rate),
    which is a Poisson process at burstiness 1; smaller is burstier, larger is more even."""
    if n == 0 or math.isinf(rate):
        return [0.0] * n
    gaps = (
        [1.0 / rate] * (n - 1)
        if math.isinf(burstiness)
        else rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1).tolist()
    )
    return [0.0, *np.cumsum(gaps).tolist()]


def build_sessions(cfg: ServeConfig, tok: Any, run_index: int, num_prompts: int) -> list[Session]:
    rng = np.random.default_rng([cfg.seed, run_index])
    if cfg.dataset_path and cfg.dataset_name in ("jsonl", "multi-turn"):
        sessions = datasets.jsonl_sessions(
            tok, cfg.dataset_path, rng, num_prompts, cfg.output_len, cfg.shuffle
        )
        if cfg.endpoint == "completions" and any(len(s.turns) > 1 or s.turns[0].messages for s in sessions):
            raise ValueError(
                f"{cfg.dataset_path}: 'messages' and 'turns' lines need --endpoint chat or responses"
            )
        return sessions
    prefix = datasets.shared_prefix(tok, cfg.seed, cfg.prefix_len)
    turns = cfg.num_turns if cfg.dataset_name == "multi-turn" else 1
    return datasets.random_sessions(
        tok, rng, num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio, prefix, turns
    )


# ---------------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    concurrency: int | None
    records: list[RequestRecord]
    duration_s: float
    summary: dict[str, Any]
    started_at: str
    warmup: dict[str, int]


class _Runner:
    def __init__(self, cfg: ServeConfig, client: httpx.AsyncClient, model: str | None, tok: Any):
        self.cfg, self.client, self.model, self.tok = cfg, client, model, tok

    def spec(self, prompt: str, messages: list[dict[str, Any]], output_len: int) -> RequestSpec:
        return RequestSpec(
            self.cfg.endpoint,
            self.cfg.url,
            self.model,
            output_len,
            prompt=prompt,
            messages=messages,
            ignore_eos=self.cfg.ignore_eos,
            temperature=self.cfg.temperature,
            extra_body=self.cfg.extra_body,
            continuous_usage=self.cfg.continuous_usage,
        )

    async def session(self, sess: Session, records: list[RequestRecord], t0: float, pbar: Any) -> None:
        history: list[dict[str, Any]] = []
        failed_turn: int | None = None
        for j, (turn, rec) in enumerate(zip(sess.turns, records, strict=True)):
            if failed_turn is not None:
                rec.error = f"not sent: turn {failed_turn} of this session failed"
            else:
                messages = turn.messages or [*history, {"role": "user", "content": turn.prompt}]
                spec = self.spec(turn.prompt, messages, turn.output_len)
                reply = await send_request(self.client, spec, rec, t0, self.cfg.request_timeout, self.tok)
                if reply is None:
                    failed_turn = j
                else:
                    history = [*messages, {"role": "assistant", "content": reply.text}]
            if pbar is not None:
                pbar.update(1)

    async def warmup(self, concurrency: int | None, run_index: int) -> dict[str, int]:
        n = self.cfg.num_warmups
        if n == 0:
            return {"num_requests": 0, "failed": 0}
        rng = np.random.default_rng([self.cfg.seed, run_index, 7])
        sessions = datasets.random_sessions(self.tok, rng, n, max(1, self.cfg.input_len), self.cfg.output_len)
        records, _ = await self.run_sessions(sessions, concurrency, math.inf, rng, None)
        return {"num_requests": n, "failed": sum(not r.success for r in records)}

    async def run_sessions(
        self,
        sessions: list[Session],
        concurrency: int | None,
        rate: float,
        rng: np.random.Generator,
        pbar: Any,
    ) -> tuple[list[RequestRecord], float]:
        records = [
            [RequestRecord(k, j, t.prompt_len, t.output_len) for j, t in enumerate(s.turns)]
            for k, s in enumerate(sessions)
        ]
        sem = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
        offsets = arrival_offsets(len(sessions), rate, self.cfg.burstiness, rng)

        async def limited(k: int) -> None:
            async with sem:
                await self.session(sessions[k], records[k], t0, pbar)

        t0 = time.perf_counter()
        tasks = []
        for k, offset in enumerate(offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(k)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        return [r for rs in records for r in rs], duration


async def _run(
    cfg: ServeConfig,
    sessions: list[Session],
    concurrency: int | None,
    run_index: int,
    model: str | None,
    tok: Any,
) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(cfg.request_timeout, connect=min(cfg.request_timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=auth_headers()) as client:
        runner = _Runner(cfg, client, model, tok)
        warm = await runner.warmup(concurrency, run_index)
        if warm["num_requests"]:
            print(f"Warm-up: {warm['num_requests']} requests, {warm['failed']} failed")
        total = sum(len(s.turns) for s in sessions)
        pbar = (
            None
            if cfg.disable_tqdm
            else tqdm(total=total, desc=f"concurrency {concurrency or 'inf'}", unit="req")
        )
        started = now_iso()
        rng = np.random.default_rng([cfg.seed, run_index, 3])
        records, duration = await runner.run_sessions(sessions, concurrency, cfg.request_rate, rng, pbar)
        if pbar is not None:
            pbar.close()
    summary = aggregate(records, duration, list(cfg.percentiles), cfg.goodput)
    return RunResult(concurrency, records, duration, summary, started, warm)


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------------------------------
# Sweep, server facts, saved results


def server_info(base_url: str) -> dict[str, Any]:
    """The server's GET /v1/models and GET /health answers (or why there was none)."""
    info: dict[str, Any] = {}
    for key, path in (("models", "/v1/models"), ("health", "/health")):
        try:
            r = httpx.get(base_url + path, timeout=10.0, headers=auth_headers())
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            info[key] = {"status": r.status_code, "body": body}
        except httpx.HTTPError as e:
            info[key] = {"status": None, "error": f"{type(e).__name__}: {e}"}
    return info


def wait_ready(base_url: str, timeout_s: float) -> bool:
    """Poll GET /health until it answers 200 (a server still loading answers 503); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/health", timeout=5.0, headers=auth_headers()).status_code == 200:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def first_model(info: dict[str, Any]) -> str | None:
    body = info["models"].get("body")
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        return body["data"][0]["id"]
    return None


def environment() -> dict[str, Any]:
    import osserve

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "osserve_version": osserve.__version__,
        "command": sys.argv,
        "date": now_iso(),
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def result_path(cfg: ServeConfig, concurrency: int | None, model: str | None) -> Path:
    conc = "inf" if concurrency is None else str(concurrency)
    if cfg.result_filename:
        name = Path(cfg.result_filename)
        if len(cfg.max_concurrency) > 1:
            name = name.with_name(f"{name.stem}-c{conc}{name.suffix or '.json'}")
    else:
        label = (cfg.label or (model or "model")).replace("/", "_")
        rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = Path(f"{label}-{cfg.endpoint}-{cfg.dataset_name}-c{conc}-{rate}qps-{stamp}.json")
    return Path(cfg.result_dir) / name


def result_json(
    cfg: ServeConfig, run: RunResult, model: str | None, info: dict[str, Any], env: dict[str, Any]
) -> dict[str, Any]:
    config = {
        **asdict(cfg),
        "max_concurrency": run.concurrency,
        "sweep": list(cfg.max_concurrency),
        "model": model,
        "url": cfg.url,
        "num_prompts": len({r.session for r in run.records}),
    }
    return {
        "schema": RESULT_SCHEMA,
        "config": config,
        "environment": {**env, "date": run.started_at},
        "server": info,
        "summary": run.summary,
        "warmup": run.warmup,
        "requests": [r.to_json() for r in run.records],
    }


def finite(obj: Any) -> Any:
    """JSON has no inf / nan: they become null (an unlimited rate, a run of zero duration)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def run_sweep(cfg: ServeConfig) -> int:
    """Run every concurrency of the sweep; print, save; 0, or 1 if some run had no successful request."""
    from osserve.harmony import get_tokenizer

    tok = get_tokenizer()
    if cfg.ready_check_timeout > 0 and not wait_ready(cfg.base_url, cfg.ready_check_timeout):
        print(
            f"warning: {cfg.base_url}/health did not answer 200 within {cfg.ready_check_timeout:g} s; "
            "starting anyway",
            file=sys.stderr,
        )
    info = server_info(cfg.base_url)
    model = cfg.model or first_model(info)
    if info["models"].get("status") != 200:
        print(
            f"warning: GET {cfg.base_url}/v1/models: {info['models'].get('error') or info['models']}",
            file=sys.stderr,
        )
    env = environment()
    print(
        f"Benchmarking {cfg.url} (model {model!r}), dataset {cfg.dataset_name}, "
        f"request rate {cfg.request_rate:g}/s, burstiness {cfg.burstiness:g}"
    )
    rows, all_failed = [], []
    for i, conc in enumerate(cfg.max_concurrency):
        n = cfg.num_prompts_for(conc)
        sessions = build_sessions(cfg, tok, i, n)
        run = asyncio.run(_run(cfg, sessions, conc, i, model, tok))
        shown = {"endpoint": cfg.url, "max_concurrency": conc, "request_rate": cfg.request_rate}
        print(format_run(run.summary, shown, list(cfg.percentile_metrics), list(cfg.percentiles)))
        if cfg.save_result:
            path = result_path(cfg, conc, model)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(finite(result_json(cfg, run, model, info, env)), indent=1) + "\n")
            print(f"Saved {path}")
        rows.append((conc, run.summary))
        if run.summary["completed"] == 0:
            all_failed.append(run)
    if len(rows) > 1:
        print(format_sweep(rows, list(cfg.percentile_metrics), list(cfg.percentiles)))
    for run in all_failed:
        first = next(iter(run.summary["errors"]), "unknown error")
        print(
            f"error: all {run.summary['num_requests']} requests failed at max concurrency "
            f"{run.concurrency or 'unlimited'} against {cfg.url}. First error: {first}. "
            "Is the server running, and does it serve this endpoint and model?",
            file=sys.stderr,
        )
    return 1 if all_failed else 0
