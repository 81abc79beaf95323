"""GPU checks of the plugin (skipped without CUDA): the Triton path under torch.compile and CUDA
graphs, FlashAttention 3 prefill, and the FP8 KV cache.

Run on the GPU machine: ``python -m pytest -q tests/test_gpu_engine.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import TINY, export, logprob_gaps, max_logprob_gap, prompts_of, reference_generate, run_vllm  # noqa: E402

PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("gpu")
    src = tiny_model("qwen3", **{**TINY, "head_dim": 64})
    return src, export(src, root / "consa", PATTERN, WINDOW)


def _split_kv_scratch_buffers(llm) -> dict:
    """How many metadata builders hold the fused decode's split-KV scratch (one per pool
    builder was the old waste; the compute modules' group needs the only one)."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    builders = [b for groups in runner.attn_groups for g in groups for b in g.metadata_builders]
    return {"builders": len(builders), "with_scratch": sum(b.scratch is not None for b in builders)}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled+cudagraphs"])
def test_gpu_greedy_parity(model, eager):
    src, dst = model
    from consa_vllm.allocation import Allocation

    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    prompts = prompts_of([40, 77, 130, 300, 9])
    ref = reference_generate(src, alloc, prompts, max_new_tokens=24)
    got = run_vllm(dst, prompts, max_tokens=24, enforce_eager=eager, max_num_batched_tokens=128,
                   gpu_memory_utilization=0.06, inspect=_split_kv_scratch_buffers)
    gap = max_logprob_gap(ref, got)
    print(f"max |dlogprob| = {gap:.2e}")
    assert got.tokens == ref.tokens
    assert gap < 2e-3
    assert got.extra == {"builders": 2, "with_scratch": 1}


def test_gpu_bf16_flash_prefill_matches_fused(model, monkeypatch):
    """bf16 prefill through FlashAttention (two launches) vs the fused Triton kernel."""
    _, dst = model
    prompts = prompts_of([40, 300, 600, 77])
    monkeypatch.setenv("CONSA_PREFILL_IMPL", "fused")
    fused = run_vllm(dst, prompts, max_tokens=8, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.06,
                     max_model_len=1024)
    monkeypatch.setenv("CONSA_PREFILL_IMPL", "auto")
    flash = run_vllm(dst, prompts, max_tokens=8, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.06,
                     max_model_len=1024)
    first = [t[0] for t in fused.tokens], [t[0] for t in flash.tokens]
    gap = max(abs(fused.top_logprobs[i][0][t] - flash.top_logprobs[i][0][t])
              for i in range(len(prompts)) for t in set(fused.top_logprobs[i][0]) & set(flash.top_logprobs[i][0]))
    print(f"bf16 first-token max |dlogprob| flash vs fused = {gap:.3e}")
    assert first[0] == first[1]
    assert gap < 0.1


def test_gpu_fp8_kv_cache_calibrated(model):
    """--kv-cache-dtype fp8, bf16, compiled with CUDA graphs, 40 prompts longer than the
    window: the ConSA model's mean |dlogprob| against the unquantized reference is no larger
    than stock vLLM's with its FP8 cache on the dense (all-F) model against its reference
    (max reported). Prefill runs FlashAttention 3 over the FP8 pools; decode too with up to
    64 sequences at once (above the fused kernel's 32), the fused Triton kernel with 16."""
    src, dst = model
    from consa_vllm.allocation import Allocation

    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    prompts = prompts_of([40 + 23 * i for i in range(40)], seed=3)
    kw = dict(dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=False, gpu_memory_utilization=0.06,
              max_model_len=1024)
    ref = reference_generate(src, alloc, prompts, max_new_tokens=24)
    gaps = {f"consa_fp8_max_seqs_{n}": logprob_gaps(ref, run_vllm(dst, prompts, 24, max_num_seqs=n, **kw))
            for n in (64, 16)}
    stock = run_vllm(src, prompts, 24, max_num_seqs=64, **kw)
    gaps["stock_fp8_all_f"] = logprob_gaps(reference_generate(src, None, prompts, max_new_tokens=24), stock)
    print(f"|dlogprob| {gaps}")
    for n in (64, 16):
        assert gaps[f"consa_fp8_max_seqs_{n}"]["mean"] <= gaps["stock_fp8_all_f"]["mean"], gaps
