"""The NIXL KV transport between GPU workers: a prefill and a decode worker sharing GPU 0, the decode worker
READing the prompt's KV device to device out of the prefill worker's pool (UCX's CUDA IPC transport; no host
copy: both pools are registered as VRAM). Needs CUDA and NIXL; skipped elsewhere."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml
from disagg_util import MODEL_NAME, complete, completion_prompts, endpoints, run, spawn, stop, wait_health
from live import free_port

from osserve.disagg.kv_nixl import import_nixl

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="KV transfer between GPU workers needs a GPU"),
    pytest.mark.skipif(import_nixl() is None, reason="needs NIXL (pip install nixl-cu13)"),
    pytest.mark.timeout(600),
]
# float32 so that greedy picks do not depend on how requests were batched.
GPU_ENGINE = {"max_seq_len": 1024, "dtype": "float32", "kv_cache_config": {"max_blocks": 256}}


def test_nixl_transfer_between_gpu_workers_matches_single_process(tiny_ckpt, tmp_path):
    port, ref_port = free_port(), free_port()
    spec = {
        "model": str(tiny_ckpt),
        "served_model_name": MODEL_NAME,
        **GPU_ENGINE,
        "frontend": {"port": port, "router_mode": "kv"},
        "workers": [
            {"role": "prefill", "devices": [0], "kv_transport": "nixl"},
            {"role": "decode", "devices": [0], "kv_transport": "nixl", "kv_transfer_timeout": 20},
        ],
    }
    (tmp_path / "deploy.yaml").write_text(yaml.safe_dump(spec))
    logs = [tmp_path / "deploy.log", tmp_path / "reference.log"]
    deployment = spawn(["serve", "--config", str(tmp_path / "deploy.yaml")], logs[0])
    reference = spawn(
        [
            "serve",
            "--model",
            str(tiny_ckpt),
            "--served-model-name",
            MODEL_NAME,
            "--port",
            str(ref_port),
            "--max-seq-len",
            "1024",
            "--dtype",
            "float32",
            "--kv-cache-config.max-blocks",
            "256",
            "--device",
            "cuda:0",
        ],
        logs[1],
    )
    url, ref_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ref_port}"
    try:
        wait_health(url, lambda code, b: code == 200, 300, "GPU deployment", logs)
        wait_health(ref_url, lambda code, b: code == 200, 300, "GPU reference", logs)
        prompts = completion_prompts(16, seed=3)

        async def all_of(base: str) -> list:
            return await asyncio.gather(*(complete(base + "/v1", p, 12, stream=True) for p in prompts))

        assert run(all_of(url)) == run(all_of(ref_url))
        body = wait_health(
            url,
            lambda code, b: (
                sum(e["kv_transfer"]["fetches"].get("nixl", 0) for e in endpoints(b, "decode")) >= 16
            ),
            10,
            "NIXL fetches",
            logs,
        )
        assert all(e["kv_cache"]["in_use"] == 0 for e in endpoints(body))
        assert not any(any(e["kv_transfer"]["fallbacks"].values()) for e in endpoints(body, "decode"))
        assert "of VRAM on cuda:0" in logs[0].read_text()  # both pools registered as device memory
    finally:
        stop(deployment)
        stop(reference)
