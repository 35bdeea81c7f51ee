"""The kernel benchmark script itself, on tiny shapes under the interpreter (the GPU run is the real use)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from osserve.bench import kernels as bench  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402


@pytest.mark.skipif(not INTERPRET, reason="checks the script under the interpreter; on a GPU run it directly")
def test_smoke_writes_results_and_best_configs(tmp_path):
    assert bench.main(["--smoke", "--only", "norm_rope", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "kernels.json").read_text())
    assert record["results"] and all(r["status"] == "ok" for r in record["results"])
    best = json.loads((tmp_path / "best_configs.json").read_text())
    assert "num_warps" in best["rms_norm"]["64"]


@pytest.mark.skipif(not INTERPRET, reason="checks the script under the interpreter; on a GPU run it directly")
def test_smoke_isolated_children(tmp_path):
    """Each suite in its own process (as on a GPU, where a faulting kernel poisons its process)."""
    assert bench.main(["--smoke", "--isolate", "--only", "norm_rope", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "kernels.json").read_text())
    assert record["results"] and all(r["status"] == "ok" for r in record["results"])
    assert "rope_write_kv T=3" in (tmp_path / "kernels.txt").read_text()


def test_best_configs_prefers_the_config_fast_everywhere():
    r = bench.Result
    results = [
        r("k", "a", {"x": 1}, key="s", median_us=2.0),
        r("k", "b", {"x": 1}, key="s", median_us=10.0),
        r("k", "a", {"x": 2}, key="s", median_us=1.0),
        r("k", "b", {"x": 2}, key="s", median_us=40.0),
        r("k", "a", {"x": 3}, key="s", median_us=1.0),
        r("k", "b", {"x": 3}, key="s", status="error"),
    ]
    assert bench.best_configs(results) == {"k": {"s": {"x": 1}}}


def test_best_configs_prefer_graph_times():
    """In-graph times (what decode steps see) rank configs where they were measured."""
    r = bench.Result
    results = [
        r("k", "a", {"x": 1}, key="s", median_us=50.0, graph_us=9.0),
        r("k", "a", {"x": 2}, key="s", median_us=40.0, graph_us=12.0),
    ]
    assert bench.best_configs(results) == {"k": {"s": {"x": 1}}}


def test_moe_crossovers():
    """MAX_PAIRS: largest count up to which gemv wins; MIN_PAIRS: smallest count from which grouped wins
    at every larger count measured (pairs where only one regime ran do not decide)."""

    def res(mode, pairs, us):
        kernel = {"gemv": "moe_gemv", "gemm": "moe_gemm", "grouped": "moe_grouped"}[mode]
        return bench.Result(
            kernel,
            f"{mode} {pairs}",
            {"v": 1},
            key="h-e32" if mode != "gemm" else "h-e32-x",
            median_us=us,
            params={"shape": "h-e32", "pairs": pairs, "mode": mode},
        )

    results = [
        res("gemv", 4, 10),
        res("gemv", 8, 12),
        res("gemv", 16, 30),
        res("gemv", 64, 20),
        res("gemm", 16, 25),
        res("gemm", 64, 40),
        res("gemm", 4096, 900),
        res("gemm", 16384, 3000),
        res("gemm", 32768, 6000),
        res("grouped", 4096, 1000),
        res("grouped", 16384, 2000),
        res("grouped", 32768, 3000),
        res("grouped", 65536, 5000),
    ]
    table = bench.best_configs(results)
    assert table["moe_gemv"]["h-e32"]["MAX_PAIRS"] == 8
    assert table["moe_grouped"]["h-e32"]["MIN_PAIRS"] == 16384
    table = bench.best_configs(results[:-4] + [res("grouped", 32768, 7000)])
    assert table["moe_grouped"]["h-e32"]["MIN_PAIRS"] == 1 << 31  # never


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="checks the script under the interpreter; on a GPU run it directly")
def test_step_profile_smoke():
    """The step profile's code paths on the tiny preset (CPU op times stand in for kernel times)."""
    from osserve.bench import kernel_profile

    res = kernel_profile.profile(["tiny"], {"bytes_per_s": 1e12, "flops": 1e14}, lambda _: None, device="cpu")
    assert set(res) == {"tiny decode b1", "tiny decode b5", "tiny prefill 2x9"}
    for case in res.values():
        assert case["step_ms"] > 0 and case["kernels"], case
        assert sum(f["share"] for f in case["families"].values()) == pytest.approx(1.0)
