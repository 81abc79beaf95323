"""The sink KV-cache spec and manager inside vLLM's own KV-cache manager (no engine).

vLLM's ``KVCacheManager`` (hybrid coordinator, block pool, prefix cache) is driven as its
scheduler drives it: ``get_computed_blocks`` then ``allocate_slots`` per step, ``free`` at
the end or on preemption. A full-attention group stands for the F pool and a
``SinkSlidingWindowSpec`` group for the S pool. The engine-level counterpart is
tests/test_sink_kv_engine.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm.v1.request import Request

from consa_vllm.plugin.sink_kv import SinkSlidingWindowManager, SinkSlidingWindowSpec, register_sink_kv_cache_spec

WINDOW, SINK, BLOCK = 32, 40, 16
NUM_SINK_BLOCKS = cdiv(SINK, BLOCK)  # 3: block 2 holds tokens 32..47, 40..47 are not sinks
CHUNK = 64  # prefill chunk (the scheduler's token budget)


def _sink_spec(block: int = BLOCK, heads: int = 2, sink: int = SINK) -> SinkSlidingWindowSpec:
    return SinkSlidingWindowSpec(block_size=block, num_kv_heads=heads, head_size=32, dtype=torch.float32,
                                 sliding_window=WINDOW, sink=sink)


def _manager(num_blocks: int = 200, full_block: int = BLOCK, full_heads: int = 2, sliding_heads: int = 2,
             caching: bool = True) -> KVCacheManager:
    """vLLM's KV-cache manager over an F group and a sink S group of equal page size."""
    register_sink_kv_cache_spec()
    init_none_hash(sha256)
    full = FullAttentionSpec(block_size=full_block, num_kv_heads=full_heads, head_size=32, dtype=torch.float32)
    sliding = _sink_spec(heads=sliding_heads)
    assert full.page_size_bytes == sliding.page_size_bytes
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["full"], full), KVCacheGroupSpec(["sliding"], sliding)])
    kvm = KVCacheManager(config, max_model_len=2048, scheduler_block_size=max(full_block, BLOCK),
                         hash_block_size=BLOCK, max_in_flight_tokens=CHUNK, enable_caching=caching)
    assert isinstance(kvm.coordinator.single_type_managers[1], SinkSlidingWindowManager)
    return kvm


def _request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=64), None,
                   block_hasher=get_request_block_hasher(BLOCK, sha256))


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + 31 * i) % 5000 + 1 for i in range(n)]


def _sliding_blocks(kvm: KVCacheManager, rid: str) -> list:
    return kvm.coordinator.single_type_managers[1].req_to_blocks[rid]


def _schedule(kvm: KVCacheManager, req: Request, trace: list | None = None) -> int:
    """Admit ``req`` as the scheduler does: prefix-cache lookup, then the first allocation.

    Checks that the blocks vLLM predicts it will take from the free pool are the blocks
    it takes (the admission count). Returns the prefix-cache hit length.
    """
    blocks, hit, _ = kvm.get_computed_blocks(req)
    n = min(req.num_tokens - hit, CHUNK)
    predicted = kvm.coordinator.get_num_blocks_to_allocate(
        req.request_id, hit + n, blocks.blocks, 0, hit, hit, hit + n)
    free = kvm.block_pool.get_num_free_blocks()
    assert kvm.allocate_slots(req, n, hit, blocks) is not None
    assert free - kvm.block_pool.get_num_free_blocks() == predicted
    req.num_computed_tokens = hit + n
    if trace is not None:
        trace.append(("prefill", list(_sliding_blocks(kvm, req.request_id))))
    return hit


def _run(kvm: KVCacheManager, req: Request, new_tokens: int, trace: list | None = None) -> int:
    """Prefill in chunks, then decode ``new_tokens``; ``trace`` gets (phase, S blocks) per step."""
    hit = _schedule(kvm, req, trace)
    while req.num_computed_tokens < req.num_tokens:
        n = min(req.num_tokens - req.num_computed_tokens, CHUNK)
        assert kvm.allocate_slots(req, n) is not None
        req.num_computed_tokens += n
        if trace is not None:
            trace.append(("prefill", list(_sliding_blocks(kvm, req.request_id))))
    for t in range(new_tokens):
        req.append_output_token_ids(100 + t)
        assert kvm.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
        if trace is not None:
            trace.append(("decode", list(_sliding_blocks(kvm, req.request_id))))
    return hit


def _blocks_ever_held(trace: list) -> dict[int, int]:
    """Block position -> the physical block a traced request held there (before it was freed)."""
    held: dict[int, int] = {}
    for _, blocks in trace:
        for j, b in enumerate(blocks):
            if not b.is_null:
                assert held.setdefault(j, b.block_id) == b.block_id
    return held


# ---------------------------------------------------------------- the spec
def test_spec_bound_adds_the_sink_blocks_to_the_sliding_window_bound():
    spec = _sink_spec()
    stock = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32,
                              sliding_window=WINDOW)
    assert stock.max_admission_blocks_per_request(CHUNK, 2048) == cdiv(WINDOW - 1 + CHUNK, BLOCK) + 1 == 7
    assert spec.max_admission_blocks_per_request(CHUNK, 2048) == NUM_SINK_BLOCKS + 7
    # Never more blocks than max_model_len tokens need (vLLM's own bound adds one here).
    assert spec.max_admission_blocks_per_request(CHUNK, 64) == 4
    # Start-up sizing and admission read the same bound.
    assert spec.page_size_bytes == stock.page_size_bytes
    assert _sink_spec(sink=1).num_sink_blocks == 1 and _sink_spec(sink=16).num_sink_blocks == 1
    assert _sink_spec(sink=17).num_sink_blocks == 2


def test_spec_is_its_own_group_type():
    spec = _sink_spec()
    stock = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32,
                              sliding_window=WINDOW)
    assert spec.is_uniform_with_collection({"a": spec, "b": _sink_spec()})
    assert not spec.is_uniform_with_collection({"a": spec, "b": _sink_spec(sink=8)})
    assert not spec.is_uniform_with_collection({"a": spec, "b": stock})
    assert spec != _sink_spec(sink=8)  # vLLM groups layers by spec equality


@pytest.mark.parametrize("sink", [0, -4, 2.5, True])
def test_spec_refuses_a_sink_below_one(sink):
    with pytest.raises(ValueError, match="sink >= 1"):
        _sink_spec(sink=sink)


def test_registration_keeps_vllm_builtins_in_a_fresh_process():
    """The plugin's register() may run before vLLM's lazy built-in registration."""
    code = textwrap.dedent("""
        import torch
        from consa_vllm.plugin import register
        register(); register()  # idempotent
        from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry as R
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
        from consa_vllm.plugin.sink_kv import SinkSlidingWindowSpec
        kw = dict(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
        for spec in (FullAttentionSpec(**kw), SlidingWindowSpec(**kw, sliding_window=8),
                     SinkSlidingWindowSpec(**kw, sliding_window=8, sink=4)):
            print(type(spec).__name__, R.get_manager_class(spec).__name__,
                  R.get_uniform_type_base_spec(spec).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-4:] == [
        "FullAttentionSpec FullAttentionManager FullAttentionSpec",
        "SlidingWindowSpec SlidingWindowManager SlidingWindowSpec",
        "SinkSlidingWindowSpec SinkSlidingWindowManager SinkSlidingWindowSpec",
        ""]


# ------------------------------------------------------------- the manager
def test_sink_blocks_kept_window_freed_bound_held_and_all_returned():
    kvm = _manager()
    free = kvm.block_pool.get_num_free_blocks()
    trace: list = []
    req = _request("long", _prompt(420))
    _run(kvm, req, 40, trace)
    prefill_bound = NUM_SINK_BLOCKS + cdiv(WINDOW - 1 + CHUNK, BLOCK) + 1
    decode_bound = NUM_SINK_BLOCKS + cdiv(WINDOW, BLOCK) + 1
    for step, (phase, blocks) in enumerate(trace):
        held = [j for j, b in enumerate(blocks) if not b.is_null]
        assert held[:NUM_SINK_BLOCKS] == list(range(NUM_SINK_BLOCKS)), (step, held)
        # Past the sinks, one contiguous run (the window) ending at the last block.
        rest = held[NUM_SINK_BLOCKS:]
        assert rest == list(range(len(blocks) - len(rest), len(blocks))), (step, held)
        assert len(held) <= (prefill_bound if phase == "prefill" else decode_bound), (step, held)
    # The sink blocks are the same physical blocks from the first chunk to the end.
    first, last = trace[0][1], trace[-1][1]
    assert [b.block_id for b in last[:NUM_SINK_BLOCKS]] == [b.block_id for b in first[:NUM_SINK_BLOCKS]]
    # The bound is reached (tight, not loose): the sinks plus the window's blocks.
    assert max(sum(not b.is_null for b in blocks) for phase, blocks in trace if phase == "decode") == decode_bound
    kvm.free(req)
    assert kvm.block_pool.get_num_free_blocks() == free


def test_stock_manager_would_have_freed_the_sinks():
    """The same run under vLLM's plain sliding-window manager keeps none of them (test validity)."""
    register_sink_kv_cache_spec()
    init_none_hash(sha256)
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    stock = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32,
                              sliding_window=WINDOW)
    config = KVCacheConfig(num_blocks=200, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["full"], full), KVCacheGroupSpec(["sliding"], stock)])
    kvm = KVCacheManager(config, max_model_len=2048, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                         max_in_flight_tokens=CHUNK)
    req = _request("long", _prompt(420))
    _run(kvm, req, 8)
    assert all(b.is_null for b in _sliding_blocks(kvm, req.request_id)[:NUM_SINK_BLOCKS])


def test_repeated_prompt_hits_with_the_same_sink_and_window_blocks():
    kvm = _manager()
    prompt = _prompt(300)
    a = _request("a", prompt)
    trace: list = []
    _run(kvm, a, 4, trace)
    a_blocks = _blocks_ever_held(trace)
    kvm.free(a)
    b = _request("b", prompt)
    hit = _schedule(kvm, b)
    # Longest whole-block hit below the prompt's last token: 18 blocks.
    assert hit == 288
    got = _sliding_blocks(kvm, "b")
    held = [j for j, blk in enumerate(got) if not blk.is_null]
    need = cdiv(WINDOW - 1, BLOCK)
    hit_blocks = hit // BLOCK
    assert held[:NUM_SINK_BLOCKS + need] == [0, 1, 2] + list(range(hit_blocks - need, hit_blocks))
    for j in [0, 1, 2] + list(range(hit_blocks - need, hit_blocks)):
        assert got[j].block_id == a_blocks[j], j
    # The rest of b runs and finishes without leaking.
    while b.num_computed_tokens < b.num_tokens:
        n = min(b.num_tokens - b.num_computed_tokens, CHUNK)
        assert kvm.allocate_slots(b, n) is not None
        b.num_computed_tokens += n
    kvm.free(b)
    assert kvm.block_pool.get_num_free_blocks() == kvm.block_pool.num_gpu_blocks - 1


def test_evicted_sink_block_shrinks_the_hit_to_the_cached_sink_prefix():
    kvm = _manager()
    prompt = _prompt(300, seed=1)
    a = _request("a", prompt)
    _run(kvm, a, 4)
    sink1 = _sliding_blocks(kvm, "a")[1].block_id
    kvm.free(a)
    kvm.block_pool.evict_blocks({sink1})  # as if reused by another request
    b = _request("b", prompt)
    hashes = b.block_hashes
    pool, spec = kvm.block_pool, kvm.kv_cache_config.kv_cache_groups[1].kv_cache_spec
    # vLLM's window-only search would still hit 288 tokens, with sink block 1 missing.
    _, stock_hit = SlidingWindowManager.find_longest_cache_hit(hashes, 288, [1], pool, spec, False, BLOCK)
    assert stock_hit == 288
    blocks, hit = SinkSlidingWindowManager.find_longest_cache_hit(hashes, 288, [1], pool, spec, False, BLOCK)
    assert hit == BLOCK and [blk.is_null for blk in blocks[0]] == [False]
    # EAGLE drops the last matched block.
    assert SinkSlidingWindowManager.find_longest_cache_hit(hashes, 288, [1], pool, spec, True, BLOCK)[1] == 0
    # Through the hybrid coordinator: the F group agrees on the shorter hit.
    assert _schedule(kvm, b) == BLOCK
    assert [blk.is_null for blk in _sliding_blocks(kvm, "b")[:2]] == [False, False]


def test_sink_blocks_are_cached_when_vllm_caches_only_window_tails():
    """F block 64, S block 16: vLLM caches only the last 2 S blocks of each 64-token segment."""
    kvm = _manager(full_block=64, full_heads=1, sliding_heads=4)
    manager = kvm.coordinator.single_type_managers[1]
    mask = manager.reachable_block_mask(0, 12, 64, manager.kv_cache_spec, False)
    stock = SlidingWindowManager.reachable_block_mask(0, 12, 64, manager.kv_cache_spec, False)
    assert stock == [False, False, True, True] * 3
    assert mask == [True, True, True, True] + [False, False, True, True] * 2
    prompt = _prompt(300, seed=2)
    a = _request("a", prompt)
    trace: list = []
    _run(kvm, a, 4, trace)
    a_blocks = _blocks_ever_held(trace)
    kvm.free(a)
    b = _request("b", prompt)
    assert _schedule(kvm, b) == 256  # aligned to the 64-token scheduler block
    got = _sliding_blocks(kvm, "b")
    assert [got[j].block_id for j in range(NUM_SINK_BLOCKS)] == [a_blocks[j] for j in range(NUM_SINK_BLOCKS)]


def test_preempted_request_frees_everything_and_resumes_from_the_cache():
    kvm = _manager()
    free = kvm.block_pool.get_num_free_blocks()
    req = _request("p", _prompt(260, seed=3))
    _schedule(kvm, req)
    for _ in range(3):
        n = min(req.num_tokens - req.num_computed_tokens, CHUNK)
        assert kvm.allocate_slots(req, n) is not None
        req.num_computed_tokens += n
    # Preemption as vLLM's scheduler does it: free all blocks, recompute from scratch.
    kvm.free(req)
    assert kvm.block_pool.get_num_free_blocks() == free
    req.num_computed_tokens = 0
    trace: list = []
    hit = _run(kvm, req, 20, trace)
    assert hit == 256  # the 4 chunks it had scheduled were cached
    assert all(not b.is_null for b in trace[-1][1][:NUM_SINK_BLOCKS])
    kvm.free(req)
    assert kvm.block_pool.get_num_free_blocks() == free


def test_without_prefix_caching():
    kvm = _manager(caching=False)
    free = kvm.block_pool.get_num_free_blocks()
    trace: list = []
    req = _request("n", _prompt(300, seed=4))
    _run(kvm, req, 10, trace)
    for phase, blocks in trace:
        assert all(not b.is_null for b in blocks[:NUM_SINK_BLOCKS])
    assert max(sum(not b.is_null for b in blocks) for _, blocks in trace[-4:]) == NUM_SINK_BLOCKS + cdiv(WINDOW, BLOCK) + 1
    kvm.free(req)
    assert kvm.block_pool.get_num_free_blocks() == free


# ------------------------------------------------------------ the config
def test_kv_offloading_refused_with_sinks_before_the_engine_starts(tmp_path, tiny_model):
    """vLLM's own config building (as under ``vllm serve``) runs the plugin's check."""
    from engine_harness import TINY
    from vllm.engine.arg_utils import EngineArgs

    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    src = tiny_model("qwen3", **TINY)
    args = dict(max_model_len=256, dtype="float32", enforce_eager=True, kv_offloading_size=1.0)
    pattern = ["FSSS", "SSSS", "SFFS", "FFFF"]
    with_sink = export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=pattern, sink=4),
                             tmp_path / "sink", force=True)
    with pytest.raises(ValueError, match=r"attention sinks \(sink 4\) cannot be served with a KV connector"):
        EngineArgs(model=str(with_sink), **args).create_engine_config()
    # The same allocation without sinks keeps vLLM's sliding-window rules: accepted.
    plain = export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=pattern),
                         tmp_path / "plain", force=True)
    assert EngineArgs(model=str(plain), **args).create_engine_config().kv_transfer_config is not None
