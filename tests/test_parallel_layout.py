"""Parallel layouts without processes: what the engine options mean, and that loading a rank reads only
that rank's slice of each checkpoint tensor."""

from __future__ import annotations

import pytest
import torch

from osserve.config import EngineConfig, get_preset
from osserve.model import loader
from osserve.model.checkpoint import expected_tensors
from osserve.parallel import ParallelConfig, split_range


def layout(**opts) -> ParallelConfig:
    return ParallelConfig.from_engine_config(EngineConfig.from_dict(opts))


def test_engine_options_map_to_trtllm_layouts():
    p = layout(tensor_parallel_size=2, moe_expert_parallel_size=2)
    assert (p.world_size, p.tp_size, p.ep_size, p.moe_tp_size, p.dp_size) == (2, 2, 2, 1, 1)
    p = layout(tensor_parallel_size=2)
    assert (p.world_size, p.moe_tp_size, p.attention_replicated) == (2, 2, False)
    p = layout(moe_expert_parallel_size=2)
    assert (p.world_size, p.tp_size, p.attention_replicated) == (2, 1, True)
    # DEP4: attention data parallel on 4 ranks, experts over the same 4.
    p = layout(tensor_parallel_size=4, moe_expert_parallel_size=4, enable_attention_dp=True)
    assert (p.world_size, p.tp_size, p.dp_size, p.ep_size, p.moe_tp_size) == (4, 1, 4, 4, 1)
    assert p.describe() == "4 ranks: attention data parallel, experts EP4 x MoE-TP1"
    # Experts over 2 ranks, each expert's intermediate dimension over the other 2.
    p = layout(tensor_parallel_size=4, moe_expert_parallel_size=2, enable_attention_dp=True).with_rank(3)
    assert (p.ep_rank, p.moe_tp_rank) == (1, 1)
    assert not layout(enable_attention_dp=True).is_distributed
    # Every (expert range, intermediate range) pair is held by exactly one rank.
    pairs = {(q.ep_rank, q.moe_tp_rank) for q in (p.with_rank(r) for r in range(4))}
    assert len(pairs) == 4


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"tensor_parallel_size": 2, "moe_expert_parallel_size": 4}, "must be 1 or the world size"),
        (
            {"tensor_parallel_size": 4, "moe_expert_parallel_size": 3},
            "ep_size .3. must be a positive divisor",
        ),
    ],
)
def test_unsupported_layouts_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        layout(**opts)
    with pytest.raises(ValueError, match="rank 2 not in"):
        ParallelConfig(rank=2, tp_size=2)


def test_split_range_covers_everything_once():
    for total, parts, unit in ((128, 4, 1), (2880, 4, 32), (2880, 3, 32), (6, 4, 1)):
        pieces = [split_range(total, parts, i, unit) for i in range(parts)]
        assert pieces[0][0] == 0 and pieces[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
        assert all((e - s) % unit == 0 for s, e in pieces)


def _expected_read(name: str, nbytes: int, par: ParallelConfig) -> int:
    """Bytes of checkpoint tensor `name` that rank `par.rank` has to read."""
    if any(s in name for s in ("q_proj.", "k_proj.", "v_proj.", "o_proj.weight", ".sinks")):
        return nbytes // par.tp_size
    if name.endswith("o_proj.bias"):
        return nbytes if par.tp_rank == 0 or par.attention_replicated else 0
    if name.endswith("down_proj_bias"):
        return nbytes // par.ep_size
    if ".experts." in name:
        return nbytes // par.world_size
    return nbytes


@pytest.mark.parametrize(
    "opts",
    [
        {"tensor_parallel_size": 2, "moe_expert_parallel_size": 2},
        {"tensor_parallel_size": 2},
        {"moe_expert_parallel_size": 2, "enable_attention_dp": True},
    ],
    ids=["tp2-ep2", "tp2", "dep2"],
)
def test_each_rank_reads_only_its_slice(tiny_ckpt, monkeypatch, opts):
    cfg = get_preset("tiny")
    specs = expected_tensors(cfg)
    read: dict[str, int] = {}

    class CountingSlice:
        def __init__(self, name, sl):
            self.name, self.sl = name, sl

        def __getitem__(self, index):
            t = self.sl[index]
            read[self.name] = read.get(self.name, 0) + t.numel() * t.element_size()
            return t

    real_open = loader.safe_open

    class CountingFile:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, name):
            return CountingSlice(name, self.inner.get_slice(name))

    monkeypatch.setattr(loader, "safe_open", CountingFile)
    par = layout(**opts)
    per_rank = []
    for rank in range(par.world_size):
        read.clear()
        p = par.with_rank(rank)
        model = loader.load_model(tiny_ckpt, torch.float32, torch.device("cpu"), parallel=p, progress=False)
        for name, spec in specs.items():
            assert read.get(name, 0) == _expected_read(name, spec.nbytes, p), (rank, name)
        per_rank.append(dict(read))
        attn = model.layers[0].self_attn
        assert attn.num_kv_heads == cfg.num_key_value_heads // p.tp_size
    # The MXFP4 experts (the bulk of a real checkpoint) are read once over all ranks together.
    for name, spec in specs.items():
        if name.endswith(("_blocks", "_scales")):
            assert sum(r[name] for r in per_rank) == spec.nbytes, name
