"""`osserve serve` options: the command line and the deployment file (parsed), and a live server started
from a deployment file with an API key and a queue limit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml
from live import ROOT, SERVED_NAME, start_cli_server, stop_cli_server

from osserve.cli import build_parser
from osserve.serve import resolve
from osserve.server.deploy import parse_deploy


def serve_args(*argv: str):  # noqa: ANN201
    return build_parser().parse_args(["serve", *argv])


def test_every_engine_option_is_a_flag(capsys) -> None:  # noqa: ANN001
    import dataclasses

    from osserve.config import EngineConfig

    with pytest.raises(SystemExit):
        serve_args("--help")
    text = capsys.readouterr().out
    defaults = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in text
        nested = getattr(defaults, f.name)
        if dataclasses.is_dataclass(nested):
            for sub in dataclasses.fields(nested):
                assert f"--{f.name.replace('_', '-')}.{sub.name.replace('_', '-')}" in text


def test_flags_map_onto_engine_config() -> None:
    config, server = resolve(
        serve_args(
            "some/model",
            "--max-batch-size",
            "3",
            "--enable-chunked-prefill",
            "false",
            "--max-seq-len",
            "512",
            "--kv-cache-config",
            '{"enable_block_reuse": false, "tokens_per_block": 32}',
            "--kv-cache-config.free-gpu-memory-fraction",
            "0.5",
            "--cuda-graph-config.enable-padding",
            "false",
            "--enable-attention-dp",
            "--port",
            "9001",
            "--max-queue-len",
            "4",
        )
    )
    assert config.model == "some/model" and config.max_batch_size == 3 and config.max_seq_len == 512
    assert config.enable_chunked_prefill is False and config.enable_attention_dp is True
    kv = config.kv_cache_config
    assert (kv.enable_block_reuse, kv.tokens_per_block, kv.free_gpu_memory_fraction) == (False, 32, 0.5)
    assert config.cuda_graph_config.enable_padding is False
    assert server["port"] == 9001 and server["max_queue_len"] == 4 and server["host"] == "127.0.0.1"


def test_bad_flag_values_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        resolve(serve_args("--max-batch-size", "0"))
    with pytest.raises(ValueError, match="valid options"):
        resolve(serve_args("--kv-cache-config", '{"bogus": 1}'))
    with pytest.raises(SystemExit):
        serve_args("--enable-chunked-prefill", "maybe")
    # bf16 copies of the experts feed the grouped GEMMs, which these backends never run.
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="bf16_experts feeds the grouped GEMMs"):
            resolve(serve_args("--moe-config.backend", backend, "--moe-config.bf16-experts", "true"))
    config, _ = resolve(serve_args("--moe-config.bf16-experts", "false"))
    assert config.moe_config.bf16_experts is False
    assert resolve(serve_args())[0].moe_config.bf16_experts is None


def test_deploy_file_top_level_and_single_worker(tmp_path) -> None:
    top = {
        "model": "m",
        "served_model_name": "srv",
        "max_batch_size": 8,
        "port": 7000,
        "kv_cache_config": {"enable_block_reuse": False},
    }
    spec = parse_deploy(top)
    assert spec.engine == {
        k: top[k] for k in ("model", "served_model_name", "max_batch_size", "kv_cache_config")
    }
    assert spec.server == {"port": 7000}
    workers = {
        "model": "m",
        "frontend": {"port": 8001},
        "workers": [
            {"role": "both", "runtime": {"max_num_tokens": 512, "kv_cache_config": {"max_blocks": 64}}}
        ],
    }
    spec = parse_deploy(workers)
    assert spec.engine == {"model": "m", "max_num_tokens": 512, "kv_cache_config": {"max_blocks": 64}}
    assert spec.server == {"port": 8001}
    # The command line overrides the file, key by key inside nested objects.
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({**workers, "kv_cache_config": {"tokens_per_block": 32}}))
    config, server = resolve(
        serve_args("--config", str(path), "--kv-cache-config.max-blocks", "99", "--port", "1")
    )
    assert config.max_num_tokens == 512 and config.kv_cache_config.max_blocks == 99
    assert config.kv_cache_config.tokens_per_block == 32 and server["port"] == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"modle": "x"}, "unknown key.*modle.*valid keys"),
        ({"workers": [{"role": "prefill"}]}, "role 'both'"),
        ({"workers": [{"role": "both"}, {"role": "both"}]}, "exactly one worker"),
        ({"workers": [{"role": "both", "runtime": {"max_batch": 3}}]}, None),
        ({"discovery": {"etcd": "http://x"}}, "multi-process"),
        ({"frontend": {"router_mode": "kv"}}, "frontend.router_mode"),
        ([1, 2], "mapping"),
    ],
)
def test_deploy_file_errors(data, match: str | None) -> None:  # noqa: ANN001
    if match is None:  # engine-option names are checked by EngineConfig, which lists the valid ones
        from osserve.config import EngineConfig

        with pytest.raises(ValueError, match="valid options"):
            EngineConfig.from_dict(parse_deploy(data).engine)
        return
    with pytest.raises(ValueError, match=match):
        parse_deploy(data)


@pytest.mark.slow  # one of the longest: pytest -m "not slow" stays under 3 minutes
def test_cli_reports_bad_config_and_help() -> None:
    env_run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "osserve", *a],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    bad = env_run("serve", "--max-batch-size", "-1")
    assert bad.returncode == 2 and "max_batch_size" in bad.stderr
    helped = env_run("serve", "--help")
    assert helped.returncode == 0 and "--kv-cache-config.free-gpu-memory-fraction" in helped.stdout
    assert env_run().returncode == 2


# ---------------------------------------------------------------------------------------------------------
# A live server from a deployment file: API key, queue limit.

API_KEY = "sk-test-secret-123"


@pytest.fixture(scope="module")
def guarded_server(tiny_checkpoint, tmp_path_factory):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("guarded")
    deploy = {
        "model": str(tiny_checkpoint),
        "served_model_name": SERVED_NAME,
        "max_queue_len": 1,
        "workers": [
            {
                "role": "both",
                "runtime": {
                    "max_batch_size": 1,
                    "max_seq_len": 1024,
                    "kv_cache_config": {"max_blocks": 128},
                    "cuda_graph_config": {"max_batch_size": 0},
                },
            }
        ],
    }
    (d / "deploy.yaml").write_text(yaml.safe_dump(deploy))
    live = start_cli_server(
        ["--config", str(d / "deploy.yaml"), "--api-key", API_KEY, "--log-level", "debug"], d / "server.log"
    )
    live.api_key = API_KEY
    yield live
    stop_cli_server(live)


def test_api_key(guarded_server) -> None:
    url = guarded_server.base_url + "/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and API_KEY not in r.text
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    # The scheme is case-insensitive (RFC 9110): "bearer" was refused before.
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert httpx.get(url, headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200, scheme
    assert httpx.get(url, headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    assert httpx.get(guarded_server.url + "/health").status_code == 200
    assert httpx.get(guarded_server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded_server.base_url, api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=guarded_server.base_url, api_key=API_KEY, max_retries=0)
    assert ok.models.list().data[0].id == SERVED_NAME
    assert API_KEY not in guarded_server.log()


def test_queue_limit(guarded_server) -> None:
    """max_batch_size 1, max_queue_len 1: one running, one queued, the third is refused at once."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": SERVED_NAME, "prompt": "queue", "max_tokens": 600, "ignore_eos": True, "stream": True}
    started = threading.Barrier(3)
    released = threading.Event()

    def hold() -> None:
        with httpx.stream(
            "POST", guarded_server.base_url + "/completions", json=body, headers=headers, timeout=60
        ) as r:
            assert r.status_code == 200
            started.wait()
            released.wait(60)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    t0 = time.monotonic()
    r = httpx.post(
        guarded_server.base_url + "/completions",
        headers=headers,
        timeout=60,
        json={**body, "stream": False, "max_tokens": 1},
    )
    elapsed = time.monotonic() - t0
    released.set()
    for t in threads:
        t.join()
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "queue_full" and elapsed < 2.0
    health = guarded_server.health()
    assert health["server"]["num_in_flight"] <= 2
    # Once the two are gone, requests get through again.
    deadline = time.monotonic() + 10
    while guarded_server.health()["server"]["num_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    ok = httpx.post(
        guarded_server.base_url + "/completions",
        headers=headers,
        timeout=60,
        json={**body, "stream": False, "max_tokens": 1},
    )
    assert ok.status_code == 200, ok.text
    assert json.loads(ok.text)["usage"]["completion_tokens"] == 1
