"""Shared fixtures: random-weight checkpoints written once per test session, live servers on the tiny one
(the CLI in a subprocess, and one in this process whose request hook can force the model's output tokens),
and the openai client. Helpers without fixtures live in live.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Keep tests off any real cache and network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from live import (  # noqa: E402
    ENGINE_FLAGS,
    SERVED_NAME,
    Forcer,
    LiveServer,
    serve_in_thread,
    start_cli_server,
    stop_cli_server,
    tiny_config,
)


def _write(tmp_path_factory: pytest.TempPathFactory, preset: str, seed: int) -> Path:
    from osserve.config import get_preset
    from osserve.model.checkpoint import write_checkpoint

    path = tmp_path_factory.mktemp(f"ckpt-{preset}-{seed}")
    write_checkpoint(get_preset(preset), path, seed=seed, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory, "tiny", 0)


@pytest.fixture(scope="session")
def tiny_odd_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory, "tiny-odd", 1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_ckpt: Path) -> Path:
    """The server tests' name for the tiny checkpoint (preset tiny, seed 0)."""
    return tiny_ckpt


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`osserve serve` in a subprocess on the tiny checkpoint."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    live = start_cli_server(
        [
            "--model",
            str(tiny_checkpoint),
            "--served-model-name",
            SERVED_NAME,
            *ENGINE_FLAGS,
            "--log-level",
            "debug",
        ],
        log,
    )
    yield live
    stop_cli_server(live)


@pytest.fixture(scope="module")
def reference(forced_server: LiveServer) -> Iterator[str]:
    """The URL of single-process serving of the tiny checkpoint, for comparing a multi-process deployment
    with; torch keeps to one thread meanwhile (the deployment's processes need the two cores too)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield forced_server.base_url
    torch.set_num_threads(threads)


@pytest.fixture()
def client(server: LiveServer):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# A server in this process whose request hook forces the model's output tokens.


@pytest.fixture(scope="session")
def forced_server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    """The app in this process (uvicorn on a thread), with a Forcer as its request hook."""
    from osserve.server.app import create_app

    forcer = Forcer()
    app = create_app(tiny_config(tiny_checkpoint), request_hook=forcer.hook)
    with serve_in_thread(app) as url:
        yield LiveServer(url, extra={"forcer": forcer, "app": app})


@pytest.fixture()
def forcer(forced_server: LiveServer) -> Forcer:
    return forced_server.extra["forcer"]


@pytest.fixture()
def forced_client(forced_server: LiveServer):
    import openai

    return openai.OpenAI(base_url=forced_server.base_url, api_key="unused", max_retries=0, timeout=60)
