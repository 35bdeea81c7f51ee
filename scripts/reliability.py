"""The figures of docs/RELIABILITY.md, measured against real `osserve serve` processes on this machine.

    python scripts/reliability.py [--model MODEL] [prompts|admission|drain|load|restart|all]

Each part starts its own server (the embedded default model unless --model), prints what it measured as
JSON lines, and stops it. Nothing here asserts: the tests (tests/test_server_*.py, tests/test_deploy_restart.py)
do that with bounds loose enough for a busy CI machine; this prints the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MILLION = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(what: str, **figures: object) -> None:
    print(json.dumps({"what": what, **figures}), flush=True)


class Server:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp()) / "server.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "osserve", "serve", "--port", str(self.port), *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def model(self) -> str:
        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _random_text(n: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choices(string.ascii_letters + string.digits + string.punctuation + " \n", k=n))


def prompts(model_args: list[str]) -> None:
    """Million-character prompts on every endpoint: status, time, and a concurrent stream's largest gap."""
    server = Server(model_args)
    try:
        server.wait_ready()
        model = server.model()
        texts = {
            "a x 1M, max_tokens 8192": ("a" * MILLION, 8192),
            "a x 1M, max_tokens 16": ("a" * MILLION, 16),
            "7 x 1M": ("7" * MILLION, 16),
            "emoji x 1M": ("\U0001f600" * MILLION, 16),
            "random printable x 1M": (_random_text(MILLION), 16),
        }
        bodies = {
            "chat": (
                "/v1/chat/completions",
                lambda t, n: {"messages": [{"role": "user", "content": t}], "max_tokens": n},
            ),
            "completions": ("/v1/completions", lambda t, n: {"prompt": t, "max_tokens": n}),
            "responses": ("/v1/responses", lambda t, n: {"input": t, "max_output_tokens": n}),
        }
        gaps: list[float] = []
        started, stop = threading.Event(), threading.Event()

        def stream() -> None:
            body = {
                "model": model,
                "prompt": "tick",
                "max_tokens": 100000,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=None) as r:
                last = None
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.monotonic()
                    if last is not None and started.is_set():
                        gaps.append(now - last)
                    last = now
                    started.set()
                    if stop.is_set():
                        return

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        started.wait(120)
        time.sleep(2.0)
        baseline = list(gaps)
        gaps.clear()
        phase = time.monotonic()
        for name, (text, max_tokens) in texts.items():
            for endpoint, (path, make) in bodies.items():
                if name == "a x 1M, max_tokens 16" and endpoint != "chat":
                    continue
                t0 = time.monotonic()
                # NOTE: a prompt that fits is not waited for (its prefill on a CPU takes minutes).
                try:
                    with httpx.stream(
                        "POST",
                        server.url + path,
                        json={"model": model, **make(text, max_tokens), "stream": True},
                        timeout=120,
                    ) as r:
                        status = r.status_code
                        body = r.read().decode()[:300] if status != 200 else ""
                except httpx.HTTPError as e:
                    status, body = None, str(e)
                report(
                    "million-character prompt",
                    prompt=name,
                    endpoint=endpoint,
                    status=status,
                    seconds=round(time.monotonic() - t0, 3),
                    error=json.loads(body)["error"]["message"][:160] if body.startswith("{") else body[:160],
                )
        phase = time.monotonic() - phase
        stop.set()
        report(
            "concurrent stream while the prompts above were handled",
            seconds=round(phase, 2),
            largest_gap_ms=round(1000 * max(gaps), 1) if gaps else None,
            num_gaps=len(gaps),
            gaps_cover_s=round(sum(gaps), 2),
            baseline_largest_gap_ms=round(1000 * max(baseline), 1) if baseline else None,
        )
    finally:
        server.stop()


async def _burst(url: str, model: str, n: int) -> tuple[list[int], list[float]]:
    statuses: list[int] = []
    refused: list[float] = []
    done = asyncio.Event()
    body = {"model": model, "prompt": "hold", "max_tokens": 100000, "ignore_eos": True, "stream": True}

    async def one(client: httpx.AsyncClient) -> None:
        t0 = time.monotonic()
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            statuses.append(r.status_code)
            if r.status_code == 503:
                refused.append(time.monotonic() - t0)
                await r.aread()
                return
            await done.wait()

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
        tasks = [asyncio.ensure_future(one(client)) for _ in range(n)]
        while len(statuses) < n:
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.gather(*tasks)
    return statuses, refused


def admission(model_args: list[str]) -> None:
    for batch, queue in ((4, 2), (4, 0)):
        server = Server([*model_args, "--max-batch-size", str(batch), "--max-queue-len", str(queue)])
        try:
            server.wait_ready()
            capacity = batch + queue
            statuses, refused = asyncio.run(_burst(server.url, server.model(), 3 * capacity))
            report(
                "burst of 3x capacity",
                max_batch_size=batch,
                max_queue_len=queue,
                sent=3 * capacity,
                accepted=statuses.count(200),
                refused_503=statuses.count(503),
                slowest_503_ms=round(1000 * max(refused), 1) if refused else None,
            )
        finally:
            server.stop()


def drain(model_args: list[str], grace: float = 5.0, n: int = 20) -> None:
    server = Server([*model_args, "--shutdown-timeout", str(grace)])
    try:
        server.wait_ready()
        model = server.model()

        async def one(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> str:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "go"}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            events: list[str] = []
            async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
            if not events or events[-1] != "[DONE]":
                return "cut without [DONE]"
            return "error event + [DONE]" if '"error"' in events[-2] else "full output + [DONE]"

        async def scenario() -> tuple[list[str], float, int, int]:
            async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=n + 4)) as client:
                flags = [asyncio.Event() for _ in range(n)]
                tasks = [
                    asyncio.ensure_future(one(client, 4 if i % 2 else 100000, f)) for i, f in enumerate(flags)
                ]
                await asyncio.gather(*(f.wait() for f in flags))
                t0 = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                health = (await client.get(server.url + "/health")).status_code
                new = (
                    await client.post(server.url + "/v1/completions", json={"model": model, "prompt": "x"})
                ).status_code
                return await asyncio.gather(*tasks), t0, health, new

        outcomes, t0, health, new = asyncio.run(scenario())
        code = server.proc.wait(grace + 60)
        report(
            "SIGTERM with streams in flight",
            shutdown_timeout_s=grace,
            streams=n,
            outcomes={k: outcomes.count(k) for k in set(outcomes)},
            health_while_draining=health,
            new_request_while_draining=new,
            exit_status=code,
            exit_after_s=round(time.monotonic() - t0, 2),
        )
    finally:
        server.stop()


def load() -> None:
    for model in ("/nonexistent/checkpoint", "openai/gpt-oss-20b"):
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": tempfile.mkdtemp()}
        p = subprocess.run(
            [sys.executable, "-m", "osserve", "serve", "--model", model, "--port", str(free_port())],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        errors = [ln for ln in (p.stdout + p.stderr).splitlines() if " ERROR " in ln]
        report(
            "model that cannot load",
            model=model,
            exit_status=p.returncode,
            seconds=round(time.monotonic() - t0, 2),
            error_lines=errors,
        )


def restart(model_args: list[str]) -> None:
    port = free_port()
    spec = {
        "model": model_args[1] if model_args else "",
        "frontend": {"port": port, "router_mode": "kv", "liveness_timeout": 3},
        "discovery": {"lease_ttl": 3},
        "workers": [{"role": "both"}],
    }
    if not model_args:
        del spec["model"]
    folder = Path(tempfile.mkdtemp())
    (folder / "deploy.yaml").write_text(yaml.safe_dump(spec))
    log = folder / "deployment.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "osserve", "serve", "--config", str(folder / "deploy.yaml")],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready_pids() -> list[int]:
            try:
                body = httpx.get(url + "/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return []
            return [e["pid"] for e in body.get("endpoints", []) if e["ready"]]

        deadline = time.monotonic() + 600
        while not ready_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        (victim,) = ready_pids()
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while (not ready_pids() or ready_pids() == [victim]) and time.monotonic() < t0 + 120:
            time.sleep(0.1)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(
            url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60
        )
        report(
            "killed worker under serve --config",
            serving_again_after_s=round(time.monotonic() - t0, 2),
            request_status=r.status_code,
        )
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "part", nargs="?", default="all", choices=("prompts", "admission", "drain", "load", "restart", "all")
    )
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    args = p.parse_args()
    model_args = ["--model", args.model] if args.model else []
    parts = ("prompts", "admission", "drain", "load", "restart") if args.part == "all" else (args.part,)
    for part in parts:
        if part == "load":
            load()
        else:
            globals()[part](model_args)


if __name__ == "__main__":
    main()
