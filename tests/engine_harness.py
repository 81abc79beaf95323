"""Shared helpers for tests that start real vLLM engines and compare them with references.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the first start in a
pytest process pays the imports, later ones take seconds. One engine is alive at a time:
:func:`run_vllm` starts it, runs everything asked, and shuts it down.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

from consa_vllm.allocation import Allocation  # noqa: E402
from consa_vllm.export import export_model  # noqa: E402


def _vllm_cpu_avx512() -> bool:
    """Whether vllm-cpu runs its AVX-512 build here. On an x86 CPU without AVX-512 or AMX it
    loads its AVX2 build (``vllm/platforms/cpu.py``), which has no FP8 KV cache (``cpu_attn``
    refuses it) and no W4A16 GEMM (``cpu_gemm_wna16``), and computes FP8 weights with other
    kernels than the AVX-512 ones the quantized tests' tolerances were measured on."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # not an x86 build choice; those platforms' own kernels apply
    return torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


VLLM_CPU_AVX512 = _vllm_cpu_avx512()
#: For the tests of vllm-cpu's FP8 KV cache and quantized kernels: skipped, with the reason, on an
#: x86 CPU without AVX-512 (a hardware limit of vllm-cpu 0.26, not of the plugin; the GPU tests
#: cover the same paths).
requires_vllm_cpu_avx512 = pytest.mark.skipif(
    not VLLM_CPU_AVX512, reason="vllm-cpu 0.26 has FP8 KV caches and quantized-weight kernels only in its AVX-512 "
                                "build; this x86 CPU has no AVX-512 or AMX, so it runs the AVX2 build")

#: The engine tests' model shape: ``tiny_model(family, seed=..., **TINY)`` (tests/conftest.py).
TINY = dict(num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32, hidden_size=128,
            intermediate_size=256, vocab_size=512, max_position_embeddings=2048)


@dataclass
class Generation:
    """Greedy tokens and, per generated position, the top-k {token: logprob}."""

    tokens: list[list[int]]
    top_logprobs: list[list[dict[int, float]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Per model step, ``[prompt index, tokens computed]`` pairs (``run_vllm(record_schedule=True)``).
    schedule: list[list[list[int]]] | None = None


def export(src: Path, out: Path, pattern: list[str], window: int, granularity: str = "kv_head") -> Path:
    alloc = Allocation(granularity=granularity, window=window, pattern=pattern)
    return export_model(src, alloc, out, force=True)


def prompts_of(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def text_prompts(tokenizer_dir: Path, lengths: list[int], seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """Prompts of real text for a trained checkpoint (random token ids are far from what it was
    trained on): windows of ``lengths`` tokens cut, at seeded offsets, from this repository's own
    ``consa_vllm`` sources (the same on every machine at one commit; Python source is also the
    pretraining domain of the testbed models of benchmarks/testbed/). Returns (prompts, where each
    was cut from)."""
    import random

    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    files = sorted(str(f.relative_to(root)) for f in (root / "consa_vllm").rglob("*.py"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    prompts, used = [], []
    for n in lengths:
        for _ in range(1000):
            name = rng.choice(files)
            ids = tok((root / name).read_text())["input_ids"]
            if len(ids) > n:
                start = rng.randrange(0, len(ids) - n)
                prompts.append(ids[start:start + n])
                used.append(f"{name}[{start}:{start + n}]")
                break
        else:
            raise ValueError(f"no source file of {n} tokens or more for a prompt")
    return prompts, used


def reference_generate(src: Path, allocation: Allocation | None, prompts: list[list[int]],
                       max_new_tokens: int, top_k: int = 5) -> Generation:
    """Greedy decoding with the HF model patched by the reference hybrid attention.

    Top-k logprobs are those of a full forward over prompt + generated tokens (teacher
    forcing), which is what vLLM reports for each sampled position.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.reference import patch_model

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if allocation is not None:
        patch_model(model, window=allocation.window, allocation=allocation)
    out = Generation(tokens=[], top_logprobs=[])
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                                 pad_token_id=0, eos_token_id=None)
            new = gen[0, len(p):].tolist()
            logits = model(gen).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            vals, idx = lp.topk(top_k, dim=-1)
            out.tokens.append(new)
            out.top_logprobs.append([dict(zip(i.tolist(), v.tolist())) for v, i in zip(vals, idx)])
    return out


def run_vllm(model_dir: Path, prompts: list[list[int]], max_tokens: int, logprobs: int = 5,
             inspect: Callable[[Any], dict] | None = None, rounds: list[int] | None = None,
             record_schedule: bool = False, **llm_kwargs) -> Generation:
    """Start an engine, generate greedily, optionally inspect it, shut it down.

    ``rounds`` splits ``prompts`` into consecutive groups of these sizes, generated one
    after another (e.g. a decode batch above the fused kernel's limit, then one within it); default: one round.

    Each round's requests are all queued before the engine schedules any of them, so its
    batches depend only on the prompts and the engine's limits, never on timing. (An engine
    core in its own process starts stepping as soon as the first request arrives: its first
    batches held whichever prompts had arrived, which made two runs of one engine on a GPU
    differ.) ``record_schedule`` keeps which prompts each model step computed in
    ``schedule`` (needs ``worker_extension_cls=engine_probe.EXTENSION``).
    """
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.distributed import cleanup_dist_env_and_memory

    kw = dict(dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True, block_size=16, seed=0)
    kw.update(llm_kwargs)
    if os.environ.get("CONSA_TEST_KV_CACHE_BYTES"):
        # A fixed KV-cache size skips vLLM's memory profiling, which fails when engines of
        # parallel test processes share one GPU (benchmarks/gpu_checks.sh).
        kw.setdefault("kv_cache_memory_bytes", int(os.environ["CONSA_TEST_KV_CACHE_BYTES"]))
    llm = LLM(model=str(model_dir), **kw)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs, ignore_eos=True)
        sizes = rounds or [len(prompts)]
        if sum(sizes) != len(prompts):
            raise ValueError(f"rounds {sizes} do not add up to {len(prompts)} prompts")
        if record_schedule:
            llm.collective_rpc("consa_schedule_start")
        outs, start = [], 0
        for n in sizes:
            # vLLM's own way to queue a batch whole: scheduling paused (sleep level 0) while
            # the requests are added, resumed once all are in.
            llm.sleep(level=0)
            llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts[start:start + n]], params,
                        use_tqdm=False)
            llm.wake_up(tags=["scheduling"])
            outs += llm.wait_for_completion(use_tqdm=False)  # in request order
            start += n
        gen = Generation(tokens=[], top_logprobs=[])
        for o in outs:
            c = o.outputs[0]
            gen.tokens.append(list(c.token_ids))
            gen.top_logprobs.append([{t: lp.logprob for t, lp in step.items()} for step in (c.logprobs or [])])
        if inspect is not None:
            gen.extra = inspect(llm)
        if record_schedule:
            gen.schedule = llm.collective_rpc("consa_schedule")[0]
        return gen
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def logprob_gaps(a: Generation, b: Generation) -> dict[str, float]:
    """Max and mean |logprob difference| over all tokens present in both top-k lists, each
    prompt up to its first token mismatch (the values :func:`max_logprob_gap` looks at)."""
    diffs = []
    for ta, tb, la, lb in zip(a.tokens, b.tokens, a.top_logprobs, b.top_logprobs):
        for i, (x, y) in enumerate(zip(ta, tb)):
            diffs += [abs(la[i][t] - lb[i][t]) for t in set(la[i]) & set(lb[i])]
            if x != y:
                break
    return {"max": max(diffs), "mean": sum(diffs) / len(diffs), "values": len(diffs)}


def max_logprob_gap(a: Generation, b: Generation) -> float:
    """Largest |logprob difference| over tokens present in both top-k lists, up to the first token mismatch."""
    gap = 0.0
    for ta, tb, la, lb in zip(a.tokens, b.tokens, a.top_logprobs, b.top_logprobs):
        for i, (x, y) in enumerate(zip(ta, tb)):
            common = set(la[i]) & set(lb[i])
            assert common, "top-k lists share no token"
            gap = max(gap, max(abs(la[i][t] - lb[i][t]) for t in common))
            if x != y:
                break
    return gap
