"""The deployment file (DESIGN.md, "Deployment file") as `osserve serve --config deploy.yaml` reads it.

This is the single-process form: engine options at the top level, or in the `runtime` of one worker of
role `both`, run inside the server process. `serve` hands files that describe several processes (prefill /
decode workers, replicas, discovery, router options) to osserve.disagg.deployment first; this
parser refuses those forms with a reason rather than ignoring them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osserve.config import EngineConfig

# Server options a deployment file may set for `serve` (CLI flags override them).
SERVER_KEYS = ("host", "port", "api_key", "max_queue_len", "shutdown_timeout", "log_level")
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig))


@dataclass
class ServeSpec:
    engine: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)


def load_deploy_file(path: str | Path) -> ServeSpec:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    try:
        return parse_deploy(data if data is not None else {})
    except ValueError as e:
        raise ValueError(f"--config {path}: {e}") from None


def parse_deploy(data: Any) -> ServeSpec:
    """A deployment mapping -> the engine options and server options of a single-process server."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping at the top level, got {type(data).__name__}")
    allowed = (*ENGINE_KEYS, *SERVER_KEYS, "workers", "frontend", "discovery")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(allowed)}")
    if data.get("discovery") is not None:
        raise ValueError("discovery is for multi-process deployments (osserve frontend / worker), not serve")
    spec = ServeSpec(
        engine={k: v for k, v in data.items() if k in ENGINE_KEYS},
        server={k: v for k, v in data.items() if k in SERVER_KEYS},
    )
    frontend = data.get("frontend") or {}
    if not isinstance(frontend, dict):
        raise ValueError("frontend must be a mapping like {port: 8000}")
    for key, value in frontend.items():
        if key not in ("host", "port"):
            raise ValueError(
                f"frontend.{key} is for multi-process deployments (osserve frontend); serve reads "
                "only frontend.host and frontend.port"
            )
        spec.server.setdefault(key, value)
    workers = data.get("workers")
    if workers is not None:
        spec.engine = merge_options(spec.engine, _single_worker_runtime(workers))
    return spec


def _single_worker_runtime(workers: Any) -> dict[str, Any]:
    if not isinstance(workers, list) or len(workers) != 1 or not isinstance(workers[0], dict):
        n = len(workers) if isinstance(workers, list) else "not a list"
        raise ValueError(
            f"serve runs exactly one worker of role 'both' (workers has {n}); deployments with "
            "several workers run with osserve frontend / worker"
        )
    worker = workers[0]
    unknown = sorted(set(worker) - {"role", "devices", "runtime", "replicas"})
    if unknown:
        raise ValueError(
            f"workers[0]: key(s) {', '.join(unknown)} not valid for a single in-process worker; "
            "valid keys: role, devices, replicas (1), runtime"
        )
    if worker.get("replicas", 1) != 1:
        raise ValueError(f"workers[0].replicas is {worker['replicas']!r}; serve runs one in-process worker")
    if worker.get("role", "both") != "both":
        raise ValueError(
            f"workers[0].role is {worker['role']!r}; serve runs role 'both' (prefill + decode in one "
            "process); separate prefill / decode workers run with osserve frontend / worker"
        )
    devices = worker.get("devices")
    runtime = worker.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise ValueError("workers[0].runtime must be a mapping of engine options")
    runtime = dict(runtime)
    if devices is not None:
        if not (isinstance(devices, list) and len(devices) == 1 and isinstance(devices[0], int)):
            raise ValueError(
                f"workers[0].devices is {devices!r}; serve runs on one device, e.g. [0] "
                "(set CUDA_VISIBLE_DEVICES for more)"
            )
        runtime.setdefault("device", f"cuda:{devices[0]}")
    return runtime


def merge_options(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested option objects (kv_cache_config, ...) are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
