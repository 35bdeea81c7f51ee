"""Engine behaviour on tiny random checkpoints: batching, chunking, prefix caching, preemption, sampling."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import make_kv_caches, prefill_batch
from helpers import run_requests as run

from osserve.config import EngineConfig
from osserve.engine.factory import build_engine
from osserve.engine.llm_engine import LLMEngine
from osserve.harmony.encoding import get_tokenizer
from osserve.sampling_params import SamplingParams


def make_engine(ckpt, **opts):
    core, _ = build_engine(EngineConfig.from_dict({"model": str(ckpt), **opts}), progress=False)
    return LLMEngine(core, get_tokenizer())


def workload(n=32, seed=0, vocab=199998, max_prompt=60, max_out=30):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, max_prompt))] for _ in range(n)]
    lens = [rng.randrange(1, max_out) for _ in range(n)]
    return prompts, lens


def greedy(n, logprobs=None):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """32 mixed requests run together with default options: the outputs every other mode must equal."""
    prompts, lens = workload()
    done = run(make_engine(tiny_ckpt), prompts, [greedy(n, logprobs=2) for n in lens])
    return prompts, lens, done


def test_batched_equals_alone_and_transformers(tiny_ckpt, reference):
    prompts, lens, done = reference
    core = make_engine(tiny_ckpt)
    for i in range(0, 32, 4):
        alone = run(core, [prompts[i]], [greedy(lens[i])])[0]
        assert alone.outputs[0].token_ids == done[i].outputs[0].token_ids
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(
        tiny_ckpt, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    for i in range(32):
        out = hf.generate(
            torch.tensor([prompts[i]]),
            max_new_tokens=lens[i],
            min_new_tokens=lens[i],
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompts[i]) :].tolist()
        assert out == done[i].outputs[0].token_ids, f"request {i}"


def _logprob_values(out):
    return [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True)]


@pytest.mark.parametrize(
    "opts",
    [
        {"max_num_tokens": 5},  # chunks smaller than the sliding window (16)
        {"max_num_tokens": 40},  # chunks larger than the window
        {"enable_chunked_prefill": False, "max_num_tokens": 64},
        {"kv_cache_config": {"enable_block_reuse": False}},
        {"kv_cache_config": {"tokens_per_block": 4, "max_blocks": 48}, "max_num_tokens": 16},  # preemption
        {"max_batch_size": 3},
        {"disable_overlap_scheduler": True},
    ],
    ids=["chunk5", "chunk40", "no-chunking", "no-prefix-cache", "preemption", "batch3", "no-overlap"],
)
def test_same_outputs_and_logprobs_in_every_mode(tiny_ckpt, reference, opts):
    prompts, lens, ref = reference
    core = make_engine(tiny_ckpt, **opts)
    done = run(core, prompts, [greedy(n, logprobs=2) for n in lens])
    if "max_blocks" in str(opts):
        assert core.scheduler.num_preemptions > 0
    for i in range(32):
        assert done[i].outputs[0].token_ids == ref[i].outputs[0].token_ids, f"request {i}"
        assert _logprob_values(done[i]) == pytest.approx(_logprob_values(ref[i]), abs=1e-4)


def test_prefix_cache_hit_is_counted_and_exact(tiny_ckpt):
    rng = random.Random(5)
    shared = [rng.randrange(199998) for _ in range(3 * 16)]  # three 16-token blocks
    a = shared + [rng.randrange(199998) for _ in range(5)]
    b = shared + [rng.randrange(199998) for _ in range(9)]
    core = make_engine(tiny_ckpt)
    run(core, [a], [greedy(4)])
    assert core.kv.usage()["prefix_hit_tokens"] == 0
    with_hit = run(core, [b], [greedy(12, logprobs=0)])[0]
    usage = core.kv.usage()
    assert usage["prefix_hit_tokens"] == 48 and usage["prefix_hit_requests"] == 1
    assert with_hit.num_cached_tokens == 48
    cold = run(
        make_engine(tiny_ckpt, kv_cache_config={"enable_block_reuse": False}), [b], [greedy(12, logprobs=0)]
    )[0]
    assert with_hit.outputs[0].token_ids == cold.outputs[0].token_ids
    assert _logprob_values(with_hit) == pytest.approx(_logprob_values(cold), abs=1e-5)


def test_sliding_window_releases_blocks(tiny_ckpt):
    """A long request holds full-length KV only in the full layers: the sliding table keeps ~window."""
    core = make_engine(tiny_ckpt, max_num_tokens=16)
    prompt = list(range(100, 300))
    core.add_request("long", prompt, greedy(2))
    seen = []
    while core.has_unfinished():
        core.step()
        rb = core.kv.reqs.get("long")
        if rb is not None:
            live = [b for b in rb.sliding if b != 0]
            seen.append((len(rb.full), len(live)))
    full, live = seen[-1]
    assert full == -(-(len(prompt) + 1) // 16)
    assert max(n for _, n in seen) <= 3  # ceil((window - 1 + chunk) / block) + 1 at most


def test_abort_frees_everything_in_the_same_step(tiny_ckpt):
    core = make_engine(tiny_ckpt, max_num_tokens=8)
    prompts, _ = workload(8, seed=3)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, greedy(50))
    for _ in range(3):
        core.step()
    assert core.kv.usage()["in_use"] > 0
    outs = core.abort([f"r{i}" for i in range(8)])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert core.kv.usage()["in_use"] == 0 and not core.has_unfinished()


@pytest.mark.slow  # one of the longest: pytest -m "not slow" stays under 3 minutes
def test_seeded_sampling_is_reproducible(tiny_ckpt):
    core = make_engine(tiny_ckpt)
    prompts, _ = workload(4, seed=9)
    sp = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234 + i, max_tokens=20, ignore_eos=True)
        for i in range(4)
    ]
    a = run(core, prompts, sp)
    # The same seeds, now batched with other (unseeded) requests, give the same tokens.
    extra = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3
    b = run(core, prompts + workload(3, seed=1)[0], sp + extra)
    assert all(a[i].outputs[0].token_ids == b[i].outputs[0].token_ids for i in range(4))
    c = run(core, prompts, [SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)] * 4)
    assert any(a[i].outputs[0].token_ids != c[i].outputs[0].token_ids for i in range(4))


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_ckpt):
    core = make_engine(tiny_ckpt)
    prompts, _ = workload(4, seed=2)
    g = run(core, prompts, greedy(10))
    for sp in (
        SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True),
    ):
        s = run(core, prompts, sp)
        assert all(s[i].outputs[0].token_ids == g[i].outputs[0].token_ids for i in range(4))


def test_n_samples_share_the_prompt_blocks(tiny_ckpt):
    core = make_engine(tiny_ckpt)
    prompt = list(range(1000, 1000 + 50))  # three full 16-token blocks and a partial one
    core.add_request(
        "fam", prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    )
    outs = None
    while core.has_unfinished():
        for o in core.step():
            outs = o
    assert outs.finished and [c.index for c in outs.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in outs.outputs)
    assert len({tuple(c.token_ids) for c in outs.outputs}) > 1
    # Samples 1 and 2 reused sample 0's three full prompt blocks, also with block reuse off.
    assert core.kv.usage()["prefix_hit_tokens"] == 2 * 48
    core2 = make_engine(tiny_ckpt, kv_cache_config={"enable_block_reuse": False})
    core2.add_request("fam", prompt, SamplingParams(n=3, max_tokens=4, ignore_eos=True))
    while core2.has_unfinished():
        core2.step()
    assert core2.kv.usage()["prefix_hit_tokens"] == 2 * 48


def test_logprobs_equal_log_softmax_of_model_logits(tiny_ckpt):
    core = make_engine(tiny_ckpt)
    prompt = list(range(500, 530))
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = run(core, [prompt], [sp])[0]
    toks = out.outputs[0].token_ids
    model = core.runner.model
    seq = prompt + toks
    batch = prefill_batch([seq], 16, model.config.sliding_window)
    ref = torch.log_softmax(model.compute_logits(model(batch, make_kv_caches(model, 8, 16))), -1)
    for j, (entry, t) in enumerate(zip(out.outputs[0].logprobs, toks, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-5)
        assert entry[t].rank == int((row > row[t]).sum()) + 1
        top = row.topk(3)
        assert [entry[i].logprob for i in top.indices.tolist()] == pytest.approx(
            top.values.tolist(), abs=1e-5
        )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        assert out.prompt_logprobs[j][prompt[j]].logprob == pytest.approx(
            ref[j - 1, prompt[j]].item(), abs=1e-5
        )
    total = sum(e[t].logprob for e, t in zip(out.outputs[0].logprobs, toks, strict=True))
    assert out.outputs[0].cumulative_logprob == pytest.approx(total)


def test_stop_token_ids_min_tokens_and_length(tiny_ckpt):
    core = make_engine(tiny_ckpt)
    prompt = list(range(10, 30))
    free_run = run(core, [prompt], [greedy(12)])[0].outputs[0].token_ids
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    out = run(core, [prompt], [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at])])[
        0
    ].outputs[0]
    assert (
        out.finish_reason == "stop" and out.stop_reason == stop_at and out.token_ids == free_run[: first + 1]
    )
    blocked = run(
        core,
        [prompt],
        [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], min_tokens=12)],
    )[0].outputs[0]
    assert (
        stop_at not in blocked.token_ids
        and blocked.finish_reason == "length"
        and len(blocked.token_ids) == 12
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} .*(must|<=)"):
        SamplingParams(**kwargs)


def test_invalid_requests(tiny_ckpt):
    core = make_engine(tiny_ckpt, max_seq_len=64)
    with pytest.raises(
        ValueError, match=r"prompt \(60 tokens\) plus max_tokens \(10\) is 70, beyond max_seq_len \(64\)"
    ):
        core.add_request("a", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(
        ValueError, match=r"prompt_token_ids\[1\] is 201088; token ids must be integers in \[0, 201088\)"
    ):
        core.add_request("b", [1, 201088], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] is -1"):
        core.add_request("c", [-1], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        core.add_request("d", [], SamplingParams(max_tokens=2))
    # numpy would fold True into an int array: still refused, by name
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] is True"):
        core.add_request("e", [1, True], SamplingParams(max_tokens=2))
    assert not core.has_unfinished() and core.kv.usage()["in_use"] == 0


def test_penalties_and_processors_run_synchronously_with_exact_history(tiny_ckpt):
    """Penalties read the generated tokens on the host, so overlap must not hide the newest one."""
    prompts, _ = workload(3, seed=4)
    sp = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5
    )
    a = run(make_engine(tiny_ckpt), prompts, sp)
    b = run(make_engine(tiny_ckpt, disable_overlap_scheduler=True), prompts, sp)
    assert all(a[i].outputs[0].token_ids == b[i].outputs[0].token_ids for i in range(3))
    seen = []

    def processor(out_ids, logits):
        seen.append(list(out_ids))
        return logits

    run(
        make_engine(tiny_ckpt),
        prompts[:1],
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logits_processors=[processor]),
    )
    assert seen == [[], seen[1][:1], seen[2][:2], seen[3][:3], seen[4][:4]] and len(seen[4]) == 4


def test_max_seq_len_is_capped_by_what_the_kv_cache_holds(tiny_ckpt):
    """With no max_tokens a request may run to max_seq_len: that must fit the pool, or it would be
    accepted and then fail. The engine lowers max_seq_len to what one request can hold."""
    core = make_engine(tiny_ckpt, kv_cache_config={"max_blocks": 20}, max_num_tokens=16)
    assert core.max_seq_len == core.kv.max_tokens_per_request(16) < 20 * 16
    assert core.kv.max_blocks_for(core.max_seq_len, 16) <= core.kv.pool.num_usable
    assert core.kv.max_blocks_for(core.max_seq_len + 1, 16) > core.kv.pool.num_usable
    out = run(core, [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[
        0
    ]
    assert out.finish_reason == "length" and len(out.token_ids) == core.max_seq_len - 3


def test_prefill_warm_up_leaves_live_blocks_untouched(tiny_ckpt):
    """The startup warm-up forwards write their K/V into the null block only: a request's output after it
    equals its output before it."""
    core = make_engine(tiny_ckpt)
    prompts, lens = workload(n=2, seed=5)
    before = run(core, prompts, [greedy(n) for n in lens])
    kv_before = [t.clone() for t, _ in core.runner.kv_caches]
    assert core.runner.warm_up([40, 17]) == [40, 17]
    for old, (new, _) in zip(kv_before, core.runner.kv_caches, strict=True):
        assert torch.equal(old[1:], new[1:])  # blocks other than the null block 0
    after = run(core, prompts, [greedy(n) for n in lens])
    assert [after[i].outputs[0].token_ids for i in range(2)] == [
        before[i].outputs[0].token_ids for i in range(2)
    ]


def test_moe_weights_check_their_bf16_copies() -> None:
    """MoEWeights refuses bf16 copies that are half given, of dense experts, or of the wrong shape / dtype."""
    from osserve.kernels.moe_weights import MoEWeights

    e, h, i = 2, 64, 32
    packed = dict(
        w13=torch.zeros(e, 2 * i, h // 32, 16, dtype=torch.uint8),
        w13_scales=torch.zeros(e, 2 * i, h // 32, dtype=torch.uint8),
        w13_bias=None,
        w2=torch.zeros(e, h, i // 32, 16, dtype=torch.uint8),
        w2_scales=torch.zeros(e, h, i // 32, dtype=torch.uint8),
        w2_bias=None,
        swiglu_limit=7.0,
        swiglu_alpha=1.702,
    )
    w13, w2 = torch.zeros(e, 2 * i, h, dtype=torch.bfloat16), torch.zeros(e, h, i, dtype=torch.bfloat16)
    assert MoEWeights(**packed, w13_bf16=w13, w2_bf16=w2).has_bf16
    assert not MoEWeights(**packed).has_bf16
    with pytest.raises(ValueError, match="both w13 and w2"):
        MoEWeights(**packed, w13_bf16=w13)
    with pytest.raises(ValueError, match="w2_bf16"):
        MoEWeights(**packed, w13_bf16=w13, w2_bf16=w2.float())
    with pytest.raises(ValueError, match="w13_bf16"):
        MoEWeights(**packed, w13_bf16=w13[:, :-1], w2_bf16=w2)
    dense = dict(packed, w13=w13, w13_scales=None, w2=w2, w2_scales=None)
    with pytest.raises(ValueError, match="packed experts"):
        MoEWeights(**dense, w13_bf16=w13, w2_bf16=w2)
