"""Attention-sink KV blocks on a real CPU engine: scheduler state of the S pool.

A tiny Qwen3 with a kv_head allocation, window 32, sink 40, block 16 for both pools (8 F
and 8 S heads): each sequence keeps 3 sink blocks in the S pool plus the window's blocks.
Read from the in-process engine's scheduler after every step (as in
tests/test_plugin_engine.py), with chunked prefill (64-token budget) and prefix caching
on; a second engine with a tiny KV cache preempts requests.

These tests check the blocks, not the attention values (tests/test_sinks_engine.py).
"""

from __future__ import annotations

import pytest

from engine_harness import TINY, Generation, max_logprob_gap, prompts_of, run_vllm

from consa_vllm.allocation import Allocation
from consa_vllm.export import export_model

pytestmark = pytest.mark.engine

WINDOW, SINK, BLOCK = 32, 40, 16
NUM_SINK_BLOCKS = -(-SINK // BLOCK)  # 3
PATTERN = ["FFSS", "SFFS", "SSSS", "FFFF"]  # 8 F and 8 S heads: block 16 in both pools
BUDGET = 64
ENGINE = dict(max_num_batched_tokens=BUDGET, enable_prefix_caching=True, max_model_len=512)
PREFILL_BOUND = NUM_SINK_BLOCKS + -(-(WINDOW - 1 + BUDGET) // BLOCK) + 1  # sinks + a chunk and its window
DECODE_BOUND = NUM_SINK_BLOCKS + -(-WINDOW // BLOCK) + 1  # the bound
LONG = 420
TOL = 1e-3


def _trace(llm, rid: str, prompt: list[int], max_tokens: int = 8) -> list[dict]:
    """Per engine step: the request's S and F block ids (None = freed) and the endpoint's counts."""
    from vllm import SamplingParams, TokensPrompt

    from consa_vllm.endpoint.engine import kv_blocks

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    full, sliding = sched.kv_cache_manager.coordinator.single_type_managers
    llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt),
                               SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    steps = []
    while llm.llm_engine.has_unfinished_requests():
        outs = llm.llm_engine.step()
        key = next((k for k in sched.requests if k.startswith(rid)), None)  # vLLM suffixes ids

        def ids(manager):
            return [None if b.is_null else b.block_id for b in manager.req_to_blocks.get(key, [])]

        snap = kv_blocks(sched)
        steps.append({
            "sliding": ids(sliding), "full": ids(full),
            "computed": sched.requests[key].num_computed_tokens if key else None,
            "in_use": {g["pool"]: g["blocks_in_use"] for g in snap["groups"]},
            "free": snap["free_blocks"],
            "cached_tokens": next((o.num_cached_tokens for o in outs if o.num_cached_tokens is not None), None),
        })
    return steps


def _inspect(llm) -> dict:
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from consa_vllm.plugin.sink_kv import SinkSlidingWindowManager, SinkSlidingWindowSpec

    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    cfg = sched.kv_cache_config
    vllm_config = llm.llm_engine.vllm_config
    spec = cfg.kv_cache_groups[1].kv_cache_spec
    sliding = sched.kv_cache_manager.coordinator.single_type_managers[1]
    stock = SlidingWindowSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                              dtype=spec.dtype, sliding_window=spec.sliding_window)
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    prompt = prompts_of([LONG], seed=7)[0]
    first = _trace(llm, "long", prompt)
    again = _trace(llm, "again", prompt)
    return {
        "specs": [type(g.kv_cache_spec).__name__ for g in cfg.kv_cache_groups],
        "block_sizes": [g.kv_cache_spec.block_size for g in cfg.kv_cache_groups],
        "sink": getattr(spec, "sink", None),
        "manager_is_sink": isinstance(sliding, SinkSlidingWindowManager) and isinstance(spec, SinkSlidingWindowSpec),
        "cap": sliding._max_admission_blocks_per_request,
        "stock_cap": stock.max_admission_blocks_per_request(vllm_config.max_in_flight_tokens,
                                                            vllm_config.model_config.max_model_len),
        "max_memory": spec.max_memory_usage_bytes(vllm_config), "page": spec.page_size_bytes,
        "free_before": free, "free_after": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        "first": first, "again": again,
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sinkkv")


@pytest.fixture(scope="module")
def model(root, tiny_model):
    src = tiny_model("qwen3", **TINY)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN, sink=SINK)
    return export_model(src, alloc, root / "qwen3-sink", force=True)


PROMPTS = prompts_of([200, 190, 180, 170], seed=5)
NEW = 150


@pytest.fixture(scope="module")
def engine(model):
    return run_vllm(model, PROMPTS, NEW, inspect=_inspect, **ENGINE)


def test_sliding_pool_uses_the_sink_spec_and_manager(engine):
    e = engine.extra
    assert e["specs"] == ["FullAttentionSpec", "SinkSlidingWindowSpec"]
    assert e["block_sizes"] == [BLOCK, BLOCK]
    assert e["sink"] == SINK and e["manager_is_sink"]
    # Admission and KV sizing count the sink blocks on top of vLLM's sliding-window bound.
    assert e["cap"] == e["stock_cap"] + NUM_SINK_BLOCKS
    assert e["max_memory"] == e["cap"] * e["page"]


def test_sink_blocks_kept_and_sliding_blocks_bounded(engine):
    steps = engine.extra["first"]
    live = [s for s in steps if s["computed"] is not None]
    assert len(live) >= LONG // BUDGET + 7  # every prefill chunk and decode step was seen
    sinks = live[0]["sliding"][:NUM_SINK_BLOCKS]
    assert None not in sinks
    for s in live:
        blocks = s["sliding"]
        held = [j for j, b in enumerate(blocks) if b is not None]
        assert blocks[:NUM_SINK_BLOCKS] == sinks, s  # the same physical sink blocks throughout
        # Past the sinks only the window's run of blocks, up to the last one.
        rest = held[NUM_SINK_BLOCKS:]
        assert rest == list(range(len(blocks) - len(rest), len(blocks))), held
        decoding = s["computed"] > LONG
        assert len(held) <= (DECODE_BOUND if decoding else PREFILL_BOUND), (s["computed"], held)
        # The F pool keeps every block.
        assert None not in s["full"] and len(s["full"]) >= -(-s["computed"] // BLOCK)
    decode = [sum(b is not None for b in s["sliding"]) for s in live if s["computed"] > LONG]
    assert decode and max(decode) == DECODE_BOUND, decode  # the bound is reached: tight


def test_block_metrics_count_the_sink_blocks(engine):
    """The /v1/consa/* counts (one live request) are the blocks the scheduler holds, sinks included."""
    e = engine.extra
    for s in e["first"]:
        held_s = sum(b is not None for b in s["sliding"])
        held_f = sum(b is not None for b in s["full"])
        assert s["in_use"] == {"full": held_f, "sliding": held_s}, s
    assert e["first"][-1]["in_use"] == {"full": 0, "sliding": 0}
    assert e["free_after"] == e["free_before"], "KV blocks leaked"


def test_repeated_prompt_reuses_the_sink_and_window_blocks(engine):
    first, again = engine.extra["first"], engine.extra["again"]
    cached = next(s["cached_tokens"] for s in again if s["cached_tokens"] is not None)
    # Prefix caching hits whole blocks below the last prompt token (416 of 420).
    assert cached == (LONG - 1) // BLOCK * BLOCK
    start = next(s for s in again if s["computed"] is not None)
    ever: dict[int, int] = {}
    for s in first:
        for j, b in enumerate(s["sliding"]):
            if b is not None:
                ever.setdefault(j, b)
    hit_blocks = cached // BLOCK
    reused = list(range(NUM_SINK_BLOCKS)) + [hit_blocks - 2, hit_blocks - 1]  # sinks + ceil((W-1)/B) window
    assert [start["sliding"][j] for j in reused] == [ever[j] for j in reused]
    assert all(start["sliding"][j] is None for j in range(NUM_SINK_BLOCKS, hit_blocks - 2))


def _step_all(llm, prompts: list[list[int]], max_tokens: int) -> Generation:
    """Run ``prompts`` together, stepping the engine, and record the preemptions vLLM made."""
    from vllm import SamplingParams, TokensPrompt

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.llm_engine.add_request(f"p{i}", TokensPrompt(prompt_token_ids=p), params)
    done, preemptions = {}, 0
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        preemptions = max([preemptions] + [r.num_preemptions for r in sched.requests.values()])
    outs = [done[f"p{i}"] for i in range(len(prompts))]
    pool = sched.kv_cache_manager.block_pool
    return Generation(tokens=[list(c.token_ids) for c in outs],
                      top_logprobs=[[{t: lp.logprob for t, lp in step.items()} for step in c.logprobs] for c in outs],
                      extra={"preemptions": preemptions, "free": pool.get_num_free_blocks(),
                             "total": pool.num_gpu_blocks - 1})


@pytest.fixture(scope="module")
def preempted(model):
    """The same prompts on a KV cache too small to run them together: requests get preempted."""
    # One 512-token request needs 32 F + min(3 + 7, 32) S blocks to be admitted at all.
    # Admitted prompts of 170-200 tokens hold about 13 F + 6 S blocks each, then grow by
    # 150 tokens (about 10 F blocks each): the running requests outgrow the 59 blocks.
    gen = run_vllm(model, PROMPTS[:1], 1, num_gpu_blocks_override=60,
                   inspect=lambda llm: {"run": _step_all(llm, PROMPTS, NEW)}, **ENGINE)
    return gen.extra["run"]


def test_preemption_frees_and_reallocates_with_the_same_outputs(engine, preempted):
    assert preempted.extra["preemptions"] > 0, "the small KV cache did not preempt any request"
    assert preempted.extra["free"] == preempted.extra["total"], "KV blocks leaked after preemption"
    assert preempted.tokens == engine.tokens
    assert max_logprob_gap(engine, preempted) < TOL
