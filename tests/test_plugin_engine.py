"""The vLLM plugin on a real CPU engine: parity with the reference and with stock vLLM, and memory.

Each fixture starts one engine, runs everything its tests need, and shuts it down (see
engine_harness). Prompts are longer than the window; chunked prefill is forced by a
small token budget so that prefill chunks attend to cached context.
"""

from __future__ import annotations

import json

import pytest

from engine_harness import (
    TINY,
    export,
    max_logprob_gap,
    prompts_of,
    reference_generate,
    run_vllm,
)

from consa_vllm.allocation import Allocation, ModelShape, estimate_kv

pytestmark = pytest.mark.engine

WINDOW = 24
LENGTHS = [30, 75, 140, 260, 9]
NEW = 16
# Uneven F counts (1, 0, 2, 4), a layer with no F head, a layer with no S head, and rows
# whose F heads are not the first ones (the loader must permute heads).
QWEN_PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
LLAMA_PATTERN = ["SSFS", "FFFF", "SSSS", "FSFS"]
ENGINE = dict(max_num_batched_tokens=64, enable_prefix_caching=True)
# docs/DESIGN.md §10: stock CPU attention vs an eager reference is ~1e-5; 1e-3 means a bug.
TOL = 1e-3


def _kv_state(llm) -> dict:
    """Scheduler-side KV cache facts of an in-process engine."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    core = llm.llm_engine.engine_core.engine_core
    cfg = core.scheduler.kv_cache_config
    return {
        "groups": [(type(g.kv_cache_spec).__name__, g.kv_cache_spec.block_size) for g in cfg.kv_cache_groups],
        "layers_per_group": [len(g.layer_names) for g in cfg.kv_cache_groups],
        "num_blocks": cfg.num_blocks,
        "page_bytes": cfg.kv_cache_groups[0].kv_cache_spec.page_size_bytes,
        "max_concurrency": get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, cfg),
    }


def _trace_long_request(llm, prompt: list[int]) -> dict:
    """Blocks each KV group holds for one long request, after every engine step."""
    from vllm import SamplingParams, TokensPrompt

    core = llm.llm_engine.engine_core.engine_core
    kvm = core.scheduler.kv_cache_manager
    managers = kvm.coordinator.single_type_managers
    free_before = kvm.block_pool.get_num_free_blocks()
    llm.llm_engine.add_request("long", TokensPrompt(prompt_token_ids=prompt),
                               SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    held = []
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        # vLLM suffixes request ids internally.
        held.append([sum(not b.is_null for k, blocks in m.req_to_blocks.items() if k.startswith("long")
                         for b in blocks) for m in managers])
    return {"held": held, "free_before": free_before, "free_after": kvm.block_pool.get_num_free_blocks()}


def _inspect_with_trace(llm) -> dict:
    state = _kv_state(llm)
    state["trace"] = _trace_long_request(llm, prompts_of([420], seed=7)[0])
    return state


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def qwen3(root, tiny_model):
    src = tiny_model("qwen3", **TINY)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=QWEN_PATTERN)
    prompts = prompts_of(LENGTHS)
    ref = reference_generate(src, alloc, prompts, NEW)
    dst = export(src, root / "qwen3-consa", QWEN_PATTERN, WINDOW)
    got = run_vllm(dst, prompts, NEW, inspect=_inspect_with_trace, **ENGINE)
    return src, alloc, ref, got


@pytest.fixture(scope="module")
def qwen3_stock_dense(root, qwen3):
    src = qwen3[0]
    prompts = prompts_of(LENGTHS)
    stock = run_vllm(src, prompts, NEW, inspect=_inspect_with_trace, **ENGINE)
    consa_all_f = run_vllm(export(src, root / "qwen3-allF", ["FFFF"] * 4, WINDOW), prompts, NEW, **ENGINE)
    return stock, consa_all_f


def test_qwen3_kv_head_greedy_parity_with_reference(qwen3):
    _, _, ref, got = qwen3
    assert got.tokens == ref.tokens
    assert max_logprob_gap(ref, got) < TOL


def test_qwen3_allocation_changes_outputs(qwen3, qwen3_stock_dense):
    """Guard against a plugin that silently serves the dense model."""
    _, _, _, got = qwen3
    stock, _ = qwen3_stock_dense
    assert got.tokens != stock.tokens


def test_all_full_equals_stock_vllm(qwen3_stock_dense):
    stock, consa = qwen3_stock_dense
    assert consa.tokens == stock.tokens
    assert max_logprob_gap(stock, consa) < TOL


def test_two_kv_groups_full_and_sliding(qwen3):
    groups = qwen3[3].extra["groups"]
    assert [g[0] for g in groups] == ["FullAttentionSpec", "SlidingWindowSpec"]


def test_sliding_heads_memory_is_bounded_by_the_window(qwen3):
    """Scheduler state: S blocks of a 420-token request stay bounded while F blocks grow."""
    state = qwen3[3].extra
    (_, block_f), (_, block_s) = state["groups"]
    trace = state["trace"]
    full_held = [h[0] for h in trace["held"]]
    slide_held = [h[1] for h in trace["held"]]
    # A prefill chunk of up to 64 tokens plus the window of context before it.
    bound = -(-(WINDOW - 1 + ENGINE["max_num_batched_tokens"]) // block_s) + 1
    assert max(slide_held) <= bound, slide_held
    assert max(full_held) >= -(-420 // block_f), full_held
    # During decode only the window's blocks remain.
    assert slide_held[-1] <= -(-(WINDOW - 1) // block_s) + 1, slide_held
    assert trace["free_after"] == trace["free_before"], "KV blocks leaked"


def _bytes_held_at_decode(state: dict) -> int:
    """KV bytes the long request held in its last decode step, from scheduler state."""
    last = [h for h in state["trace"]["held"] if any(h)][-1]  # the final entry is after release
    return sum(n * state["page_bytes"] * layers for n, layers in zip(last, state["layers_per_group"]))


def test_capacity_grows_as_estimated(qwen3, qwen3_stock_dense):
    """KV bytes per long sequence, stock dense vs ConSA, as held by vLLM, follow the estimator.

    The number of such sequences that fit in a fixed KV budget grows by this same ratio.
    """
    src, alloc, _, got = qwen3
    stock = qwen3_stock_dense[0].extra
    measured = _bytes_held_at_decode(stock) / _bytes_held_at_decode(got.extra)
    (_, block_f), (_, block_s) = got.extra["groups"]
    # The long request is 420 prompt tokens + 8 generated; the last step holds 427 tokens.
    shape = ModelShape.from_model_dir(src)
    dense_blocks = estimate_kv(alloc, shape, 427, dtype="float32", block_size=16).dense_bytes_per_sequence
    consa = estimate_kv(alloc, shape, 427, dtype="float32", block_size=(block_f, block_s)).bytes_per_sequence
    predicted = dense_blocks / consa
    print(json.dumps({"measured_gain": measured, "predicted_gain": predicted}))
    assert measured > 1.5
    # The plugin pads the smaller pool's page by a few percent (layout.choose_block_sizes).
    assert measured == pytest.approx(predicted, rel=0.05)


@pytest.fixture(scope="module")
def llama(root, tiny_model):
    src = tiny_model("llama", seed=1, **TINY)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=LLAMA_PATTERN)
    prompts = prompts_of(LENGTHS, seed=1)
    ref = reference_generate(src, alloc, prompts, NEW)
    got = run_vllm(export(src, root / "llama-consa", LLAMA_PATTERN, WINDOW), prompts, NEW, **ENGINE)
    return src, ref, got


def test_llama_kv_head_greedy_parity_with_reference(llama):
    _, ref, got = llama
    assert got.tokens == ref.tokens
    assert max_logprob_gap(ref, got) < TOL


def _stock_llama_with_windows(src, dst, layer_types: list[str]):
    """The same weights as a stock Llama whose config slides on the given layers."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(layer_types=layer_types, sliding_window=WINDOW)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


LAYER_ROWS = ["SSSS", "FFFF", "SSSS", "SSSS"]


@pytest.fixture(scope="module")
def llama_layerwise(root, llama):
    src = llama[0]
    prompts = prompts_of(LENGTHS, seed=2)
    types = ["sliding_attention" if r[0] == "S" else "full_attention" for r in LAYER_ROWS]
    stock = run_vllm(_stock_llama_with_windows(src, root / "llama-stock-layers", types), prompts, NEW, **ENGINE)
    as_layer = run_vllm(export(src, root / "llama-layer", LAYER_ROWS, WINDOW, "layer"), prompts, NEW, **ENGINE)
    as_heads = run_vllm(export(src, root / "llama-rows", LAYER_ROWS, WINDOW, "kv_head"), prompts, NEW, **ENGINE)
    return stock, as_layer, as_heads


def test_layer_allocation_equals_stock_llama_layer_types(llama_layerwise):
    stock, as_layer, _ = llama_layerwise
    assert as_layer.tokens == stock.tokens
    assert max_logprob_gap(stock, as_layer) < TOL


def test_kv_head_rows_equal_stock_layer_windows(llama_layerwise):
    """The fused two-pool path against stock vLLM kernels on the same F/S layers."""
    stock, _, as_heads = llama_layerwise
    assert as_heads.tokens == stock.tokens
    assert max_logprob_gap(stock, as_heads) < TOL


@pytest.fixture(scope="module")
def llama_all_sliding(root, llama):
    src = llama[0]
    prompts = prompts_of(LENGTHS, seed=3)
    # Stock vLLM on CPU crashes on an all-sliding model with the hybrid manager (docs/DESIGN.md
    # §7); without it, stock still applies the window in the kernel: a valid numerical oracle.
    stock = run_vllm(_stock_llama_with_windows(src, root / "llama-stock-allS", ["sliding_attention"] * 4),
                     prompts, NEW, disable_hybrid_kv_cache_manager=True, **ENGINE)
    consa = run_vllm(export(src, root / "llama-allS", ["SSSS"] * 4, WINDOW, "layer"), prompts, NEW,
                     inspect=_kv_state, **ENGINE)
    return stock, consa


def test_all_sliding_equals_stock_sliding_window(llama_all_sliding):
    stock, consa = llama_all_sliding
    assert consa.tokens == stock.tokens
    assert max_logprob_gap(stock, consa) < TOL
    assert [g[0] for g in consa.extra["groups"]] == ["SlidingWindowSpec"]


def test_trained_allocation_is_served(root, tiny_model):
    """Trainer CLI -> allocation file -> export -> the plugin serves it like the reference."""
    import subprocess
    import sys

    from consa_vllm.tiny import stdlib_python_files

    src = tiny_model("qwen3", seed=2, **TINY)
    data = root / "train-data"
    data.mkdir(exist_ok=True)
    for p in stdlib_python_files(6):
        (data / f"{p.stem}.py").write_text(p.read_text(errors="ignore"))
    out = root / "trained.json"
    args = ["--model", src, "--data", data, "--seq-len", 64,
                        "--window", WINDOW, "--steps", 30, "--batch-size", 2, "--target-sparsity", 0.5,
                        "--granularity", "kv_head", "--constraint", "per-layer", "--freeze-weights",
                        "--gate-lr", 0.1, "--out", out, "--log-dir", root / "train-log", "--device", "cpu",
                        "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "consa_vllm.train", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    alloc = Allocation.load(out)
    assert alloc.sparsity == 0.5 and all(row.count("S") == 2 for row in alloc.pattern)
    prompts = prompts_of([50, 120], seed=4)
    ref = reference_generate(src, alloc, prompts, 8)
    from consa_vllm.export import export_model

    got = run_vllm(export_model(src, out, root / "trained-model", force=True), prompts, 8, **ENGINE)
    assert got.tokens == ref.tokens
    assert max_logprob_gap(ref, got) < TOL
