"""`osserve bench serve` against a live tiny `osserve serve` (a subprocess of this checkout): a concurrency
sweep whose every aggregate is recomputed here from the saved per-request records, token counts checked
against the server's usage and its Prometheus counters, charts, the chat / responses / multi-turn paths, and
a run against the server once stopped. The last test stops the module's server."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from osserve.bench.load_generator import ServeConfig, run_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SERVED = "tiny-bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Live:
    url: str
    proc: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = tmp_path_factory.mktemp("bench-live") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "osserve",
                "serve",
                "--model",
                str(tiny_ckpt),
                "--port",
                str(port),
                "--served-model-name",
                SERVED,
                "--max-seq-len",
                "1024",
                "--kv-cache-config.max-blocks",
                "256",
                "--cuda-graph-config.max-batch-size",
                "0",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"server not healthy:\n{log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield Live(url, proc, log)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "osserve", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def generation_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^osserve_generation_tokens_total ([0-9.e+]+)$", text, re.M).group(1))


# ---------------------------------------------------------------------------------------------------------
# Independent recomputation (plain Python, no numpy)


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def check_summary(result: dict) -> None:
    s, reqs, cfg = result["summary"], result["requests"], result["config"]
    ok = [r for r in reqs if r["success"]]
    dur = s["duration_s"]
    assert s["num_requests"] == len(reqs) and s["completed"] == len(ok) and s["failed"] == len(reqs) - len(ok)
    # the run lasts from the first send to the last answer
    assert min(r["start_time"] for r in reqs) >= 0
    assert max(r["start_time"] + r["e2el"] for r in ok) <= dur + 1e-6
    tin = sum(r["prompt_tokens"] if r["prompt_tokens"] is not None else r["prompt_len"] for r in ok)
    tout = sum(r["output_tokens"] for r in ok)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (tin, tout)
    assert s["request_throughput"] == pytest.approx(len(ok) / dur)
    assert s["input_throughput"] == pytest.approx(tin / dur)
    assert s["output_throughput"] == pytest.approx(tout / dur)
    assert s["total_token_throughput"] == pytest.approx((tin + tout) / dur)
    timed = [r for r in ok if r["ttft"] is not None]
    tpot = {
        id(r): (r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) for r in timed if r["output_tokens"] > 1
    }
    speeds = [(r["output_tokens"] - 1) / (r["e2el"] - r["ttft"]) for r in timed if r["output_tokens"] > 1]
    series = {
        "ttft": [r["ttft"] for r in timed],
        "tpot": list(tpot.values()),
        "itl": [g for r in ok for g in r["itl"]],
        "e2el": [r["e2el"] for r in ok],
    }
    for name, xs in series.items():
        ms = [x * 1000 for x in xs]
        if not ms:
            assert s[f"mean_{name}_ms"] is None
            continue
        mean = sum(ms) / len(ms)
        assert s[f"mean_{name}_ms"] == pytest.approx(mean)
        assert s[f"std_{name}_ms"] == pytest.approx(
            math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)), abs=1e-6
        )
        assert s[f"median_{name}_ms"] == pytest.approx(pct(ms, 50))
        for p in cfg["percentiles"]:
            assert s[f"p{p:g}_{name}_ms"] == pytest.approx(pct(ms, p))
    assert s["output_tokens_per_user_per_s"] == (pytest.approx(sum(speeds) / len(speeds)) if speeds else None)
    if cfg["goodput"]:
        slo = cfg["goodput"]

        def good(r):
            if "ttft" in slo and (r["ttft"] is None or r["ttft"] * 1000 > slo["ttft"]):
                return False
            if (
                "tpot" in slo
                and r["output_tokens"] > 1
                and (id(r) not in tpot or tpot[id(r)] * 1000 > slo["tpot"])
            ):
                return False
            return "e2el" not in slo or r["e2el"] * 1000 <= slo["e2el"]

        assert s["good_requests"] == sum(good(r) for r in ok)
        assert s["request_goodput"] == pytest.approx(s["good_requests"] / dur)


# ---------------------------------------------------------------------------------------------------------


def test_sweep_saved_recomputed_and_plotted(live, tmp_path):
    before = generation_tokens(live.url)
    res_dir, png_dir = tmp_path / "results", tmp_path / "png"
    p = cli(
        "serve",
        "--base-url",
        live.url + "/v1",
        "--endpoint",
        "/v1/completions",
        "--num-prompts",
        "3",
        "--random-input-len",
        "16",
        "--random-output-len",
        "5",
        "--random-prefix-len",
        "6",
        "--random-range-ratio",
        "0.3",
        "--max-concurrency",
        "1,2",
        "--num-warmups",
        "1",
        "--seed",
        "3",
        "--metric-percentiles",
        "50,90,99",
        "--goodput",
        "ttft:60000",
        "tpot:30000",
        "--label",
        "tiny",
        "--save-result",
        "--result-dir",
        str(res_dir),
        "--result-filename",
        "sweep.json",
        "--metadata",
        "note=ci",
        "--disable-tqdm",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Serving Benchmark Result" in p.stdout and "Sweep (latencies in ms)" in p.stdout
    files = sorted(res_dir.glob("*.json"))
    assert [f.name for f in files] == ["sweep-c1.json", "sweep-c2.json"]
    results = [json.loads(f.read_text()) for f in files]
    outputs = 0
    for conc, result in zip((1, 2), results, strict=True):
        cfg = result["config"]
        assert (cfg["max_concurrency"], cfg["sweep"], cfg["model"]) == (conc, [1, 2], SERVED)
        assert cfg["endpoint"] == "completions" and cfg["metadata"] == {"note": "ci"}
        assert result["server"]["models"]["body"]["data"][0]["id"] == SERVED
        assert result["server"]["health"]["status"] == 200
        assert {"host", "python", "osserve_version", "date"} <= set(result["environment"])
        assert result["warmup"] == {"num_requests": 1, "failed": 0}
        reqs = result["requests"]
        assert len(reqs) == 3 and all(r["success"] for r in reqs), [r["error"] for r in reqs]
        for r in reqs:
            # completions send the text as is: the server counts exactly the requested prompt tokens
            assert r["prompt_tokens"] == r["prompt_len"] and 6 + 11 <= r["prompt_len"] <= 6 + 20
            # ignore_eos + min_tokens: exactly the asked output, as the server's usage reported it
            assert r["output_tokens"] == r["output_len"] and 3 <= r["output_len"] <= 6
            assert r["output_tokens_source"] == "usage"
            assert r["ttft"] is not None and len(r["itl"]) <= r["output_tokens"] - 1
        check_summary(result)
        outputs += result["summary"]["total_output_tokens"] + 5  # + the warm-up request
    # the server's own counter of generated tokens agrees with the usage the bench saved
    deadline = time.monotonic() + 10
    while generation_tokens(live.url) - before != outputs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert generation_tokens(live.url) - before == outputs

    p = cli("plot", *map(str, files), "--out", str(png_dir), "--num-gpus", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    pngs = sorted(png_dir.glob("*.png"))
    assert [f.name for f in pngs] == ["latency_vs_concurrency.png", "throughput_vs_interactivity.png"]
    import matplotlib.image

    for f in pngs:
        data = f.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        # Not a blank canvas: the panels hold lines and points in colours, not only the white background
        # and black axes.
        rgb = matplotlib.image.imread(f)[..., :3]
        coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
        assert coloured.mean() > 0.001, f"{f.name}: {coloured.sum()} coloured pixels"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_chat_and_responses_count_from_usage(live, tmp_path, endpoint):
    cfg = ServeConfig(
        base_url=live.url,
        endpoint=endpoint,
        num_prompts=2,
        input_len=10,
        output_len=4,
        max_concurrency=(2,),
        save_result=True,
        result_dir=str(tmp_path),
        disable_tqdm=True,
        percentiles=(50.0, 99.0),
    )
    assert run_sweep(cfg) == 0
    [result] = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    for r in result["requests"]:
        assert r["success"], r["error"]
        assert r["output_tokens"] == 4 and r["output_tokens_source"] == "usage"
        # the server wraps the message in Harmony (system message, role headers): more tokens than the text
        assert r["prompt_tokens"] > r["prompt_len"] == 10
    check_summary(result)


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_multi_turn_history_grows(live, tmp_path, endpoint):
    cfg = ServeConfig(
        base_url=live.url,
        endpoint=endpoint,
        dataset_name="multi-turn",
        num_prompts=2,
        num_turns=2,
        input_len=6,
        output_len=3,
        max_concurrency=(2,),
        save_result=True,
        result_dir=str(tmp_path),
        disable_tqdm=True,
    )
    assert run_sweep(cfg) == 0
    [result] = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    reqs = result["requests"]
    assert len(reqs) == 4 and all(r["success"] for r in reqs), [r["error"] for r in reqs]
    for k in range(2):
        turns = sorted((r for r in reqs if r["session"] == k), key=lambda r: r["turn"])
        for a, b in zip(turns, turns[1:], strict=False):
            assert b["start_time"] >= a["start_time"] + a["e2el"]
            # the next prompt holds the previous one, the server's reply and the new user message
            assert b["prompt_tokens"] > a["prompt_tokens"] + b["prompt_len"]
    check_summary(result)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streams_without_visible_text_are_timed_from_the_first_token(
    forced_server, forcer, tmp_path, endpoint
):
    """A random model's output may never leave the Harmony header: no text, so nothing to time by. The
    server counts tokens in every chunk (continuous usage) and the bench times those instead, and says so."""
    from osserve.harmony.encoding import CHANNEL

    # A header that never ends within max_tokens: <|channel|> and then header text, no <|message|>.
    key = forcer.force([CHANNEL] + [forced_server.extra["app"].state.server.tokenizer.encode(" x")[0]] * 12)
    out = 6

    def run(continuous: bool, sub: str) -> dict:
        cfg = ServeConfig(
            base_url=forced_server.url,
            endpoint=endpoint,
            model="osserve-tiny-test",
            num_prompts=2,
            input_len=8,
            output_len=out,
            max_concurrency=(2,),
            extra_body={"user": key},
            continuous_usage=continuous,
            save_result=True,
            result_dir=str(tmp_path / sub),
            disable_tqdm=True,
        )
        assert run_sweep(cfg) == 0
        [result] = [json.loads(f.read_text()) for f in (tmp_path / sub).glob("*.json")]
        return result

    if endpoint == "completions":  # the raw text of these tokens is visible: nothing to fall back on
        result = run(True, "c")
        assert result["summary"]["num_timed_from_first_token"] == 0
        assert all(r["timed_from"] == "output" and r["ttft"] is not None for r in result["requests"])
        return
    result = run(True, "on")
    for r in result["requests"]:
        assert r["success"] and r["output_tokens"] == out, r
        assert r["timed_from"] == "first_token" and r["ttft"] is not None and r["ttft"] < r["e2el"], r
        assert 1 <= len(r["itl"]) <= out - 1, r  # outputs that queued up arrive as one event
    s = result["summary"]
    assert s["num_timed_from_first_token"] == 2 and s["num_without_output_events"] == 0
    assert (
        s["median_ttft_ms"] is not None and s["median_tpot_ms"] is not None and s["median_itl_ms"] is not None
    )
    check_summary(result)
    off = run(False, "off")["summary"]  # a server without continuous usage: n/a, as before
    assert off["num_without_output_events"] == 2 and off["median_ttft_ms"] is None


def test_stopped_server_reports_failures_and_exits_nonzero(live, tmp_path):
    live.proc.terminate()
    live.proc.wait(30)
    p = cli(
        "serve",
        "--base-url",
        live.url,
        "--model",
        SERVED,
        "--num-prompts",
        "3",
        "--random-input-len",
        "8",
        "--random-output-len",
        "2",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--disable-tqdm",
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"Failed requests:\s+3", p.stdout)
    assert "all 3 requests failed" in p.stderr and "connection failed" in p.stderr
    assert "Is the server running" in p.stderr
    [saved] = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert saved["summary"]["failed"] == 3 and saved["server"]["models"]["status"] is None
