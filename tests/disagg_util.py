"""Helpers of the disaggregated-serving tests: processes, /health polling, requests and their reference."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "osserve-tiny-test"  # conftest's SERVED_NAME: the single-process reference serves it too
# The engine options of conftest's reference server (forced_server), so outputs are comparable.
ENGINE = {
    "max_seq_len": 1024,
    "kv_cache_config": {"max_blocks": 256},
    "cuda_graph_config": {"max_batch_size": 0},
}


def env(**extra: str) -> dict[str, str]:
    # One OpenMP thread per process: several engines share this machine's cores.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def spawn(args: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "osserve", *args],
        cwd=ROOT,
        env=env(**extra_env),
        stdout=f,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped by its parent yet) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def health(url: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(url + "/health", timeout=10)
    return r.status_code, r.json()


def wait_health(
    url: str,
    ok: Callable[[int, dict[str, Any]], bool],
    timeout: float,
    what: str,
    logs: list[Path] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            code, body = health(url)
            last = (code, body)
            if ok(code, body):
                return body
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            last = e
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs or [] if p.exists())
    raise AssertionError(f"{what} not within {timeout}s; last /health: {last}\n{tails}")


def serve_deployment(spec: dict[str, Any], tmp: Path, **extra_env: str) -> tuple[subprocess.Popen, str, Path]:
    """`osserve serve --config` of `spec` (a deployment file's content); returns (process, frontend URL, log)
    once every worker the spec names is ready. The caller stops the process."""
    path = tmp / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp / "deployment.log"
    proc = spawn(["serve", "--config", str(path)], log, **extra_env)
    url = f"http://127.0.0.1:{spec['frontend']['port']}"
    workers = sum(w.get("replicas", 1) for w in spec["workers"])
    try:
        wait_health(
            url,
            lambda code, body: code == 200 and [e["ready"] for e in endpoints(body)] == [True] * workers,
            120,
            "deployment healthy",
            [log],
        )
    except BaseException:
        stop(proc)
        raise
    return proc, url, log


def endpoints(body: dict[str, Any], role: str | None = None) -> list[dict[str, Any]]:
    return [e for e in body.get("endpoints", []) if role is None or e["role"] == role]


# -- requests ---------------------------------------------------------------------------------------------
def completion_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of 2 to ~90 tokens; some share long prefixes (prefix cache, KV-aware routing)."""
    import random

    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "theta",
        "kappa",
        "lambda",
        "omicron",
        "sigma",
        "omega",
        "river",
        "stone",
        "cloud",
        "forest",
        "ember",
        "quartz",
        "signal",
        "vector",
    ]
    shared = " ".join(rng.choice(words) for _ in range(40))
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 50)))
        out.append(f"{shared} {body}" if i % 3 == 0 else body)
    return out


async def complete(
    base_url: str, prompt: str, max_tokens: int, stream: bool, n: int = 1, logprobs: int | None = None
) -> dict[str, Any]:
    """One greedy /v1/completions request through the openai client: the text of each choice, finish
    reason, the logprobs' tokens (if asked), error (if any)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    kw = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "n": n,
        "logprobs": logprobs,
        "extra_body": {"ignore_eos": True},
    }
    texts, finish, tokens = [""] * n, None, []
    try:
        if not stream:
            r = await client.completions.create(**kw)
            chunks = [r]
        else:
            chunks = [c async for c in await client.completions.create(stream=True, **kw)]
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] += c.text
                finish = c.finish_reason or finish
                if c.logprobs is not None and c.index == 0:
                    tokens += c.logprobs.tokens
        out = {"text": texts[0], "finish": finish, "error": None}
        if n > 1:
            out["texts"] = texts
        if logprobs is not None:
            out["logprob_tokens"] = tokens
        return out
    except openai.APIError as e:
        return {"text": None, "finish": None, "error": str(e)}
    finally:
        await client.close()


async def chat(base_url: str, content: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    kw = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    try:
        if not stream:
            r = await client.chat.completions.create(**kw)
            m = r.choices[0].message
            return {
                "content": m.content,
                "reasoning": getattr(m, "reasoning_content", None),
                "finish": r.choices[0].finish_reason,
                "tokens": r.usage.completion_tokens,
            }
        content_, finish, tokens = "", None, None
        async for chunk in await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw
        ):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices:
                content_ += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return {"content": content_, "finish": finish, "tokens": tokens}
    finally:
        await client.close()


def http_client(timeout: float = 60) -> httpx.AsyncClient:
    """One client for many concurrent streams (creating a client per request costs ~20 ms of CPU each)."""
    return httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
    )


async def stream_events(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A raw SSE /v1/completions stream: its text, finish reason, error event and when it ended."""
    text, finish, error = "", None, None
    async with client.stream(
        "POST", url + "/v1/completions", json={"model": MODEL_NAME, "stream": True, **body}
    ) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            if event.get("choices"):
                text += event["choices"][0]["text"]
                finish = event["choices"][0]["finish_reason"] or finish
            if on_event is not None:
                on_event(event)
    return {"text": text, "finish": finish, "error": error, "ended": time.monotonic()}


def run(coro: Any) -> Any:
    return asyncio.run(coro)
