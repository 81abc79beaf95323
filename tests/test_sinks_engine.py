"""Streaming heads (attention sinks) served by the plugin: greedy parity with the reference.

For sink in {1, 4, 16}, uneven kv_head allocations (and a layer allocation, which sinks
move from stock per-layer windows to the two pools), prompts much longer than sink + W,
chunked prefill (64-token budget) and prefix caching on, float32: the engine's greedy
tokens equal those of the HF model patched by the reference attention
(``consa_vllm.reference.patch_model``, where an S head sees keys 0..sink-1 and
i-W+1..i), and the top-k logprobs agree within 1e-3. Each engine also traces one long
request and checks that its S blocks stay within ceil(sink/B) + ceil(W/B) + 1 during
decode, with the sink blocks held throughout.
"""

from __future__ import annotations

import json

import pytest

from engine_harness import TINY, max_logprob_gap, prompts_of, reference_generate, run_vllm

from consa_vllm.allocation import Allocation
from consa_vllm.export import export_model

pytestmark = pytest.mark.engine

WINDOW = 24
LENGTHS = [120, 200, 260, 340, 9]
NEW = 16
BUDGET = 64
ENGINE = dict(max_num_batched_tokens=BUDGET, enable_prefix_caching=True)
TOL = 1e-3  # as tests/test_plugin_engine.py: float32 CPU attention vs the eager reference
LONG = 420
# (family, seed, sink, pattern, granularity): uneven F counts per layer, a layer without F
# heads, one without S heads, F heads not first in their row (the loader permutes heads);
# and a layer allocation, which sinks move from stock per-layer windows to the pools.
CASES = [
    ("qwen3", 0, 1, ["FSSS", "SSSS", "SFFS", "FFFF"], "kv_head"),
    ("llama", 1, 4, ["SSFS", "FFFF", "SSSS", "FSFS"], "kv_head"),
    ("qwen3", 2, 16, ["SFSS", "SSSF", "FFSS", "SSSS"], "kv_head"),
    ("llama", 3, 4, ["SSSS", "FFFF", "SSSS", "SSSS"], "layer"),
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _trace_long(llm) -> dict:
    """S blocks one long request holds after every step, and the S block size."""
    from vllm import SamplingParams, TokensPrompt

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    groups = sched.kv_cache_config.kv_cache_groups
    sliding = sched.kv_cache_manager.coordinator.single_type_managers[-1]
    llm.llm_engine.add_request("long", TokensPrompt(prompt_token_ids=prompts_of([LONG], seed=9)[0]),
                               SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    steps = []
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        key = next((k for k in sched.requests if k.startswith("long")), None)
        if key is not None:
            steps.append((sched.requests[key].num_computed_tokens,
                          [not b.is_null for b in sliding.req_to_blocks.get(key, [])]))
    return {"spec": type(groups[-1].kv_cache_spec).__name__, "block": groups[-1].kv_cache_spec.block_size,
            "steps": steps}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sinks")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[4]}-sink{c[2]}")
def served(request, root, tiny_model):
    family, seed, sink, pattern, granularity = request.param
    src = tiny_model(family, seed=seed, **TINY)
    alloc = Allocation(granularity=granularity, window=WINDOW, pattern=pattern, sink=sink)
    prompts = prompts_of(LENGTHS, seed=seed)
    ref = reference_generate(src, alloc, prompts, NEW)
    no_sink = reference_generate(src, Allocation(granularity=granularity, window=WINDOW, pattern=pattern), prompts,
                                 NEW)
    dst = export_model(src, alloc, root / f"{family}-{seed}-{granularity}-sink{sink}", force=True)
    got = run_vllm(dst, prompts, NEW, inspect=_trace_long, **ENGINE)
    return sink, ref, no_sink, got


def test_reference_attends_to_the_sinks(served):
    """Guard: the sinks change the reference's outputs, so parity below is about sinks."""
    _, ref, no_sink, _ = served
    assert ref.tokens != no_sink.tokens or max_logprob_gap(ref, no_sink) > 10 * TOL, (
        "the reference attention ignores the allocation's sink")


def test_greedy_parity_with_the_reference(served):
    sink, ref, _, got = served
    gap = max_logprob_gap(ref, got)
    print(json.dumps({"sink": sink, "max_logprob_gap": gap}))
    assert got.tokens == ref.tokens
    assert gap < TOL


def test_sliding_blocks_per_sequence_within_the_sink_bound(served):
    sink, _, _, got = served
    trace = got.extra
    assert trace["spec"] == "SinkSlidingWindowSpec"
    block = trace["block"]
    sink_blocks = _cdiv(sink, block)
    decode = [held for computed, held in trace["steps"] if computed > LONG]
    assert decode, "no decode step traced"
    for computed, held in trace["steps"]:
        assert all(held[:sink_blocks]), (computed, held)  # sinks kept
    bound = sink_blocks + _cdiv(WINDOW, block) + 1
    print(json.dumps({"sink": sink, "block": block, "max_sliding_blocks_in_decode": max(sum(h) for h in decode),
                      "bound": bound}))
    assert max(sum(h) for h in decode) <= bound
