"""`osserve serve --config deploy.yaml` for a deployment of several processes (DESIGN.md, "Deployment file").

This process is the frontend; each worker entry starts `replicas` worker processes (`osserve worker`), with
CUDA_VISIBLE_DEVICES set from `devices`. A worker that exits on its own is started again after a backoff
(1 s, doubling up to 30 s); one that exits more than `max_restarts` times in a row (default 5; a worker
that ran a minute counts afresh) makes the whole deployment drain and exit with status 1. `max_restarts: 0`
turns restarts off: a worker that exits stays down and the frontend routes around it. On SIGTERM / SIGINT the
frontend drains (osserve/server/lifecycle.py), then every worker gets SIGTERM (and SIGKILL after
`STOP_TIMEOUT_S`); workers also get SIGTERM from the kernel if this process dies without cleaning up
(PR_SET_PDEATHSIG), so none is left orphaned.

```yaml
model: openai/gpt-oss-120b
served_model_name: openai/gpt-oss-120b
max_seq_len: 32768                       # engine options here apply to every worker
frontend: {host: 0.0.0.0, port: 8000, router_mode: kv}
discovery: {etcd: http://127.0.0.1:2379, lease_ttl: 10}   # optional; default: the frontend's registry
workers:
  - {role: prefill, devices: [0, 1, 2, 3], runtime: {tensor_parallel_size: 4, max_num_tokens: 20000}}
  - {role: decode, devices: [4, 5, 6, 7], replicas: 1, runtime: {tensor_parallel_size: 4, max_batch_size: 128}}
```
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osserve.config import EngineConfig
from osserve.disagg.messages import ROLES, check_kv_transport
from osserve.disagg.remote_engine import FrontendSettings
from osserve.disagg.router import ROUTER_MODES
from osserve.disagg.worker import check_role_fits_engine
from osserve.server.deploy import ENGINE_KEYS, merge_options

logger = logging.getLogger("osserve.disagg.deployment")

STOP_TIMEOUT_S = 20.0
RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, largest
STABLE_S = 60.0  # a worker that ran this long before it exited starts a fresh count of restarts
FRONTEND_KEYS = (
    "host",
    "port",
    "router_mode",
    "api_key",
    "max_queue_len",
    "registry_port",
    "liveness_timeout",
    "retry_timeout",
    "max_retries",
    "shutdown_timeout",
    "log_level",
)
DISCOVERY_KEYS = ("etcd", "namespace", "lease_ttl")
WORKER_KEYS = (
    "role",
    "devices",
    "replicas",
    "runtime",
    "kv_transport",
    "kv_hold_timeout",
    "kv_transfer_timeout",
    "host",
    "max_restarts",
)


@dataclass
class WorkerSpec:
    role: str
    engine: dict[str, Any]
    devices: list[int] | None = None
    replicas: int = 1
    kv_transport: str = "auto"
    kv_hold_timeout: float = 60.0
    kv_transfer_timeout: float = 30.0
    host: str = "127.0.0.1"
    max_restarts: int = 5


@dataclass
class DeploymentSpec:
    frontend: dict[str, Any]
    discovery: dict[str, Any]
    workers: list[WorkerSpec] = field(default_factory=list)
    model: str = ""
    served_model_name: str | None = None


def _load(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping at the top level")
    return data


def is_multi_process(path: str | Path) -> bool:
    """Does the deployment file describe more than one process (else `serve` runs it in-process)?"""
    data = _load(path)
    workers = data.get("workers")
    frontend = data.get("frontend") or {}
    return bool(
        data.get("discovery")
        or (isinstance(frontend, dict) and set(frontend) - {"host", "port"})
        or (
            isinstance(workers, list)
            and (
                len(workers) != 1
                or any(
                    isinstance(w, dict) and (w.get("role", "both") != "both" or w.get("replicas", 1) != 1)
                    for w in workers
                )
            )
        )
    )


def _check_keys(where: str, d: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(allowed)}")
    return dict(d)


def parse_deployment(data: dict[str, Any]) -> DeploymentSpec:
    allowed = (*ENGINE_KEYS, "frontend", "discovery", "workers")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(allowed)}")
    common = {k: v for k, v in data.items() if k in ENGINE_KEYS}
    frontend = _check_keys("frontend", data.get("frontend"), FRONTEND_KEYS)
    mode = frontend.get("router_mode", "round-robin")
    if mode not in ROUTER_MODES:
        raise ValueError(f"frontend.router_mode is {mode!r}; allowed: {', '.join(ROUTER_MODES)}")
    discovery = _check_keys("discovery", data.get("discovery"), DISCOVERY_KEYS)
    workers_data = data.get("workers")
    if not isinstance(workers_data, list) or not workers_data:
        raise ValueError("workers must be a non-empty list of {role, devices, runtime}")
    workers = []
    for i, w in enumerate(workers_data):
        w = _check_keys(f"workers[{i}]", w, WORKER_KEYS)
        role = w.get("role", "both")
        if role not in ROLES:
            raise ValueError(f"workers[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        runtime = _check_keys(f"workers[{i}].runtime", w.get("runtime"), ENGINE_KEYS)
        engine = merge_options(common, runtime)
        devices = w.get("devices")
        if devices is not None and not (
            isinstance(devices, list)
            and devices
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
        ):
            raise ValueError(
                f"workers[{i}].devices is {devices!r}; expected a list of GPU indices like [0, 1]"
            )
        if devices is not None:
            engine.setdefault("device", "cuda:0")  # the first of its CUDA_VISIBLE_DEVICES
        try:
            check_role_fits_engine(role, EngineConfig.from_dict(engine))
        except ValueError as e:
            raise ValueError(f"workers[{i}].runtime: {e}") from None
        try:
            check_kv_transport(w.get("kv_transport", "auto"))
        except ValueError as e:
            raise ValueError(f"workers[{i}].{e}") from None
        replicas = w.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"workers[{i}].replicas must be an integer >= 1, got {replicas!r}")
        restarts = w.get("max_restarts", 5)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"workers[{i}].max_restarts must be an integer >= 0, got {restarts!r}")
        workers.append(
            WorkerSpec(
                role,
                engine,
                devices,
                replicas,
                w.get("kv_transport", "auto"),
                float(w.get("kv_hold_timeout", 60.0)),
                float(w.get("kv_transfer_timeout", 30.0)),
                w.get("host", "127.0.0.1"),
                restarts,
            )
        )
    roles = {w.role for w in workers}
    if "prefill" in roles and not roles & {"decode", "both"}:
        raise ValueError("workers: prefill workers need a decode (or both) worker to hand requests to")
    if "decode" in roles and "prefill" not in roles:
        raise ValueError("workers: decode workers need a prefill worker")
    return DeploymentSpec(
        frontend, discovery, workers, common.get("model", ""), common.get("served_model_name")
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, however it dies (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Worker:
    """One worker process of the deployment, and its restarts."""

    worker_id: str
    cmd: list[str]
    env: dict[str, str]
    max_restarts: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # exits in a row
    restart_at: float | None = None


class Deployment:
    """The worker processes of one deployment: started, restarted when they exit, stopped."""

    def __init__(self, spec: DeploymentSpec, settings: FrontendSettings, log_level: str, lease_ttl: float):
        self.spec = spec
        self.settings = settings
        self.log_level = log_level
        self.lease_ttl = lease_ttl
        self.workers: list[_Worker] = []
        # The workers (on this host) reach the frontend's registry here, whatever address it binds.
        host, _, port = settings.registry_address.removeprefix("tcp://").rpartition(":")
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "*", "") else host
        self.registry_address = f"tcp://{local}:{port}"
        self.stopping = False
        self.failed: str | None = None  # why the deployment gave up
        self._lock = threading.Lock()

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        s = self.settings
        total = sum(w.replicas for w in self.spec.workers)
        out = []
        counts: dict[str, int] = {}
        for w in self.spec.workers:
            for _ in range(w.replicas):
                n = counts[w.role] = counts.get(w.role, -1) + 1
                wid = f"{w.role}-{n}"
                cmd = [
                    sys.executable,
                    "-m",
                    "osserve",
                    "worker",
                    "--role",
                    w.role,
                    "--worker-id",
                    wid,
                    "--host",
                    w.host,
                    "--namespace",
                    s.namespace,
                    "--lease-ttl",
                    str(self.lease_ttl),
                    "--kv-transport",
                    w.kv_transport,
                    "--kv-hold-timeout",
                    str(w.kv_hold_timeout),
                    "--kv-transfer-timeout",
                    str(w.kv_transfer_timeout),
                    "--engine-json",
                    json.dumps(w.engine),
                    "--log-level",
                    self.log_level,
                ]
                cmd += ["--etcd", s.etcd] if s.etcd else ["--registry", self.registry_address]
                env = dict(os.environ)
                if w.devices is not None:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, w.devices))
                elif "OMP_NUM_THREADS" not in env:
                    # CPU workers share the cores; oversubscribed OpenMP threads spin and slow every one.
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // total))
                out.append((wid, cmd, env))
        return out

    def start(self) -> None:
        restarts = [w.max_restarts for w in self.spec.workers for _ in range(w.replicas)]
        for (wid, cmd, env), limit in zip(self.commands(), restarts, strict=True):
            worker = _Worker(wid, cmd, env, limit)
            self._spawn(worker)
            self.workers.append(worker)

    def _spawn(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(w.cmd, env=w.env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        w.started, w.restart_at = time.monotonic(), None
        logger.info("started worker %s (pid %d)", w.worker_id, w.proc.pid)

    def check(self) -> None:
        """Restart workers that exited on their own, after their backoff; give up on one that keeps
        exiting (`failed` says why)."""
        with self._lock:
            for w in self.workers:
                if self.stopping or self.failed or w.proc is None:
                    return
                now = time.monotonic()
                if w.restart_at is not None:
                    if now >= w.restart_at:
                        self._spawn(w)
                    continue
                code = w.proc.poll()
                if code is None or w.failures < 0:
                    continue
                if w.max_restarts == 0:
                    logger.error("worker %s (pid %d) exited with status %s", w.worker_id, w.proc.pid, code)
                    w.failures = -1  # reported; stays down
                    continue
                w.failures = 1 if now - w.started >= STABLE_S else w.failures + 1
                if w.failures > w.max_restarts:
                    self.failed = (
                        f"worker {w.worker_id} exited {w.failures} time(s) in a row (last: exit status {code}); "
                        f"max_restarts is {w.max_restarts}"
                    )
                    logger.error("giving up: %s", self.failed)
                    return
                first, most = RESTART_BACKOFF_S
                delay = min(most, first * 2 ** (w.failures - 1))
                w.restart_at = now + delay
                logger.error(
                    "worker %s (pid %d) exited with status %s; restarting it in %.0f s (restart %d of at most %d)",
                    w.worker_id,
                    w.proc.pid,
                    code,
                    delay,
                    w.failures,
                    w.max_restarts,
                )

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
        alive = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in alive:
            w.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in alive:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                logger.warning("worker %s did not stop in %.0fs; killing it", w.worker_id, STOP_TIMEOUT_S)
                w.proc.kill()  # type: ignore[union-attr]
                w.proc.wait()  # type: ignore[union-attr]
        if alive:
            logger.info("stopped %d worker(s)", len(alive))


def run_deployment(args: argparse.Namespace) -> int:
    """`osserve serve --config FILE` with a multi-process deployment file; flags --host, --port,
    --api-key, --log-level, --max-queue-len override the frontend's settings."""
    from osserve.disagg.frontend import create_frontend_app, serve_app
    from osserve.server.logs import setup_logging

    try:
        spec = parse_deployment(_load(args.config))
        fe = dict(spec.frontend)
        for key in ("host", "port", "api_key", "log_level", "max_queue_len", "shutdown_timeout"):
            if hasattr(args, key):
                fe[key] = getattr(args, key)
        host, port = fe.get("host", "127.0.0.1"), int(fe.get("port", 8000))
        disc = spec.discovery
        lease_ttl = float(disc.get("lease_ttl", 10.0))
        registry_port = fe.get("registry_port") or _free_port(host)
        roles = tuple(sorted({w.role for w in spec.workers}))
        settings = FrontendSettings(
            router_mode=fe.get("router_mode", "round-robin"),
            etcd=disc.get("etcd"),
            registry_address=f"tcp://{host}:{registry_port}",
            namespace=disc.get("namespace", "default"),
            expect_roles=roles,
            liveness_timeout=float(fe.get("liveness_timeout", lease_ttl)),
            retry_timeout=float(fe.get("retry_timeout", 5.0)),
            max_retries=int(fe.get("max_retries", 3)),
        )
    except ValueError as e:
        print(f"osserve serve: error: {e}", file=sys.stderr)
        return 2
    log_level = fe.get("log_level", "info")
    setup_logging(log_level)
    deployment = Deployment(spec, settings, log_level, lease_ttl)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # a requested stop; `finally` stops the workers

    # Until uvicorn takes over the signals, SIGTERM unwinds through `finally`; uvicorn raises the signal it
    # caught again once it has shut down, which lands here too.
    signal.signal(signal.SIGTERM, on_term)
    try:
        app = create_frontend_app(
            settings,
            model=spec.model,
            served_model_name=spec.served_model_name,
            api_key=fe.get("api_key") or os.environ.get("OSSERVE_API_KEY"),
            max_queue_len=fe.get("max_queue_len"),
            shutdown_timeout=float(fe.get("shutdown_timeout", 30.0)),
        )
        app.state.remote_engine.before_shutdown.append(deployment.stop)
        deployment.start()
        stopped = threading.Event()

        def watch_workers() -> None:
            while not stopped.wait(0.5):
                deployment.check()
                if deployment.failed:  # the frontend drains and the process exits with status 1
                    app.state.server.fail(deployment.failed)
                    return

        threading.Thread(target=watch_workers, name="osserve-workers", daemon=True).start()
        try:
            return serve_app(app, host, port, log_level)
        finally:
            stopped.set()
    finally:
        deployment.stop()
