"""GPU checks of the plugin (skipped without CUDA): the Triton path under torch.compile and CUDA
graphs, FlashAttention 3 prefill, and the FP8 KV cache (calibrated, on the tests' model and on
its sharp-attention copy, ``gpu_parity.SHARP``).

Run on the GPU machine: ``python -m pytest -q tests/test_gpu_engine.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.engine, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_harness import TINY, export, max_logprob_gap, prompts_of, reference_generate, run_vllm  # noqa: E402

PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
WINDOW = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("gpu")
    src = tiny_model("qwen3", **{**TINY, "head_dim": 64})
    return src, export(src, root / "consa", PATTERN, WINDOW)


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory, tiny_model):
    """``model`` with every attention logit scaled 3x (``gpu_parity.SHARP``)."""
    import shutil

    from gpu_parity import SHARP, scale_attention_logits

    root = tmp_path_factory.mktemp("gpu-sharp")
    src = root / "src"
    shutil.copytree(tiny_model("qwen3", **{**TINY, "head_dim": 64}), src)
    scale_attention_logits(src, SHARP)
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
    # Three builders: vLLM groups layers per KV-cache group by (backend, spec, query heads), so
    # the F group holds the F pool layer and the compute layers apart, and the S group its
    # pool layer (the same count on CPU); only the compute layers' builder holds the scratch.
    assert got.extra == {"builders": 3, "with_scratch": 1}


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


#: Both engines of the compile-ahead test compile the rest of the model alike. Each engine gets
#: its own torch.compile and Inductor caches (vLLM's cache key differs between them), and
#: Inductor picks reduction configs and combo kernels by timing them on the GPU: with other
#: processes loading the GPU (run 30: about 30 test processes) the picks can differ between
#: the two engines, and the bf16 greedy tokens of the random test model with them. Inductor's
#: deterministic mode makes no pick by timing; it refuses the combo kernels' benchmarking, so
#: those are off (as in run 16's Mixtral diagnostics).
SAME_INDUCTOR = {"inductor_compile_config": {"deterministic": True, "combo_kernels": False}}

OUR_KERNELS = ("_hybrid_attn_kernel", "_reduce_segments_kernel", "_sink_merge_kernel", "_write_kv_kernel",
               "_write_kv_hybrid_kernel", "_quantize_query_kernel")


def _compiles_of_one_engine(dst, prompts, rounds, monkeypatch, cache_dir, precompile: str) -> tuple[list, object]:
    """Serve ``prompts`` from cold kernel caches (a fresh shared Triton folder, nothing in
    memory) with ``CONSA_PRECOMPILE=precompile``; return each compile of our kernels in the
    engine as (kernel, compiled by the compile ahead, cache key), and the generation."""
    import triton

    from consa_vllm.plugin.ops import triton_hybrid as th

    for name in OUR_KERNELS:
        getattr(th, name).device_caches.clear()
    compiles = []

    def hook(**kw):
        if kw["fn"].name in OUR_KERNELS:
            compiles.append((kw["fn"].name, kw["is_manual_warmup"], str(kw["key"])))

    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", hook)
    monkeypatch.setenv("CONSA_TRITON_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("CONSA_PRECOMPILE", precompile)
    gen = run_vllm(dst, prompts, max_tokens=16, rounds=rounds, dtype="bfloat16", enforce_eager=False,
                   gpu_memory_utilization=0.06, max_model_len=1024, compilation_config=SAME_INDUCTOR)
    return compiles, gen


def _first_divergence(a, b) -> str:
    """Where two generations first differ, with each engine's logprobs of both tokens there
    (None: not in its top 5): a near tie or a wrong engine."""
    for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        for j, (x, y) in enumerate(zip(ta, tb)):
            if x != y:
                la, lb = a.top_logprobs[i][j], b.top_logprobs[i][j]
                return (f"prompt {i}, token {j}: {x} against {y}; first engine's logprobs {la.get(x)} / {la.get(y)}, "
                        f"second's {lb.get(x)} / {lb.get(y)}")
    return "the same tokens"


def test_gpu_kernels_compile_ahead_of_their_first_launch(model, tmp_path, monkeypatch):
    """consa_vllm/plugin/precompile.py: from cold caches, an engine with sinks (16), compiled with
    CUDA graphs, serving a batch-1 decode (the split-KV kernel), a round of 20 (FlashAttention 3
    and the sink merge) and prefills longer than the window, compiles every variant of our
    kernels ahead, at its first step: no kernel compiles at a real launch, and the variants
    compiled ahead include every one that the same engine compiles at its launches with the
    compile ahead off. Both engines generate the same tokens (Inductor compiles the rest of the
    model alike in both: :data:`SAME_INDUCTOR`). Needs the engine in this process
    (gpu_checks.sh: INPROC=1), where Triton's compile hook sees it."""
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    src, _ = model
    dst = export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN, sink=16),
                       tmp_path / "consa-sink16", force=True)
    prompts = prompts_of([300] + [40 + 11 * i for i in range(20)] + [90])
    rounds = [1, 20, 1]
    lazy, gen_lazy = _compiles_of_one_engine(dst, prompts, rounds, monkeypatch, tmp_path / "cold-off", "0")
    ahead, gen_ahead = _compiles_of_one_engine(dst, prompts, rounds, monkeypatch, tmp_path / "cold-on", "1")
    print("compiled at launch, compile ahead off:", sorted({(n, k[:80]) for n, _, k in lazy}))
    print(f"compiled ahead: {sum(w for _, w, _ in ahead)}; at launch: {sum(not w for _, w, _ in ahead)}")
    assert lazy and not any(w for _, w, _ in lazy)  # the workload launches our kernels, lazily by default
    assert {"_hybrid_attn_kernel", "_reduce_segments_kernel", "_sink_merge_kernel"} <= {n for n, _, _ in lazy}
    assert [c for c in ahead if not c[1]] == []
    assert {k for _, _, k in lazy} <= {k for _, w, k in ahead if w}
    assert gen_ahead.tokens == gen_lazy.tokens, _first_divergence(gen_lazy, gen_ahead)


def test_gpu_fp8_kv_cache_calibrated(model, tmp_path):
    """--kv-cache-dtype fp8, bf16, compiled with CUDA graphs, prompts longer than the window,
    calibrated as in gpu_parity.py: each engine's own tokens scored against the unquantized
    float32 reference (teacher forcing); the ConSA model's mean and max |dlogprob| no larger
    than stock vLLM's with its FP8 cache on the all-F model. Rounds of 40 and 12 sequences (decode
    above the fused kernel's 4: FlashAttention 3 over the FP8 pools) and 4 (the fused
    Triton kernel); prefill runs FlashAttention 3 over the FP8 pools. The ConSA all-F export
    (the same model as stock's) is served too, for the like-for-like comparison."""
    _fp8_kv_calibrated(model, tmp_path, "engine-fp8-kv.json")


def test_gpu_fp8_kv_cache_calibrated_sharp_attention(sharp_model, tmp_path):
    """The same on the model with every attention logit scaled 3x."""
    _fp8_kv_calibrated(sharp_model, tmp_path, "engine-fp8-kv-sharp.json")


def _fp8_kv_calibrated(model, tmp_path, report_name: str) -> None:
    import os
    from pathlib import Path

    from gpu_parity import Variant, prompt_draw, run_variants

    from consa_vllm.allocation import Allocation

    src, dst = model
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    all_f = Allocation(granularity="kv_head", window=WINDOW, pattern=["FFFF"] * 4)
    variants = [Variant("stock_all_f", src), Variant("consa", dst, alloc),
                Variant("consa_all_f", export(src, tmp_path / "all-f", all_f.pattern, WINDOW), all_f)]
    report = Path(os.environ.get("CONSA_GPU_REPORT_DIR", tmp_path)) / report_name
    res = run_variants(src, variants, prompts_of([40 + 23 * i for i in range(56)], seed=prompt_draw(3)), 24, rounds=[40, 12, 4],
                       report=report, pairs=[("consa", "stock_all_f"), ("consa_all_f", "stock_all_f")],
                       dtype="bfloat16", kv_cache_dtype="fp8", max_model_len=1536)
    print(f"FP8 KV: stock all-F {res['stock_all_f']}; consa {res['consa']}; consa all-F {res['consa_all_f']}")
    assert res["consa"].mean <= res["stock_all_f"].mean
    assert res["consa"].max <= res["stock_all_f"].max
