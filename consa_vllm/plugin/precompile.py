"""Compile a ConSA engine's Triton kernels ahead, all at once, at its first step.

Stock vLLM's attention (FlashAttention 3) is compiled ahead of time; the ConSA attention's
Triton kernels compile at their first launch. With a warm cache
(:mod:`.ops.triton_cache`, one folder shared by every engine of a machine) that costs
milliseconds; on a cold one, the first engine of a machine (a fresh node or container, a
new GPU or Triton version), each kernel variant compiles at its first launch, one after
another inside vLLM's CUDA-graph warm-up: about 5 s of compiles and launcher builds on an
H100, 1.28-1.39x of stock's engine start (docs/RESULTS.md).

At the engine's first step with a KV cache (the first warm-up run of vLLM's CUDA-graph
capture, before any capture) :func:`precompile_engine` replays, for every ConSA layer of
the engine, the launches of three batch shapes, a decode step of one sequence, a decode
step one sequence beyond the fused kernel's limit, and a prefill, through the backend's own
path choice (``ConsaAttentionImpl.pools`` and ``attend``), in compile-only mode with
FlashAttention 3 left out. The variants they need (the layer classes, 2D and split-KV paths,
the sink merge, the K/V writes and the FP8 query quantization) then compile in parallel
(:func:`.ops.triton_cache.compile_in_parallel`). The launches' arguments are the engine's
own tensors, or tensors of the same strides, so each variant's Triton key is the one the
real launch computes; a variant the replay misses still compiles at its first launch, as
before.

``CONSA_PRECOMPILE=0`` turns it off (read, and a bad value refused, when vLLM builds the
model: ``ConsaAttentionImpl`` then marks its layers done).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vllm.logger import init_logger

from consa_vllm.plugin.knobs import env_flag

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handler shows it

ENV = "CONSA_PRECOMPILE"


def precompile_enabled() -> bool:
    """``CONSA_PRECOMPILE`` (default 1): whether :func:`precompile_engine` compiles ahead."""
    return env_flag(ENV, default=True)


def no_flash_attn(**kwargs):
    """Stands in for FlashAttention 3 in compile-only mode: no launch, and a log-sum-exp of
    FlashAttention's layout (``[heads, tokens]`` float32) where one is asked for."""
    if not kwargs.get("return_softmax_lse"):
        return kwargs["out"]
    q = kwargs["q"]
    return kwargs["out"], torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)


def like(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A tensor of ``rows`` rows with ``x``'s other sizes, strides, dtype and device (so the
    Triton keys of launches on it are those of launches on ``x``); ``x`` itself, cut, where it
    has the rows."""
    if x.shape[0] >= rows:
        return x[:rows]
    return torch.empty_strided((rows, *x.shape[1:]), x.stride(), dtype=x.dtype, device=x.device)


def batch_shapes(scratch, fused_max_seqs: int, has_flash_attn: bool) -> list[tuple[int, int]]:
    """(sequences, new tokens per sequence) of the batches whose launches are compiled: a
    decode step of one sequence (the split-KV path where there is a scratch), the smallest
    decode batch past that path (FlashAttention 3's, or the 2D kernel's), and a prefill."""
    rows = scratch.max_seqs if scratch is not None else 0
    past = (fused_max_seqs if has_flash_attn else rows) + 1
    return [(1, 1), (past, 1), (1, 2)]


def precompile_engine(ctx, attn_metadata, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      output: torch.Tensor) -> None:
    """Compile every ConSA layer's kernel variants of this engine in parallel (see the
    module doc), then mark the layers done. Called by the first ConSA layer of the engine's
    first step with a KV cache, with that layer's arguments (under CUDA-graph capture: of its
    next step outside one); a no-op where the engine does not run the Triton op (CPU). With
    ``CONSA_PRECOMPILE=0`` the layers are built marked done and never call it.
    A failure is logged and the kernels compile at their first launches, as before."""
    from consa_vllm.plugin.backend import ConsaAttentionImpl

    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # nothing may compile or allocate inside a capture: the next eager step does it
    entries = [(m, m.impl) for m in ctx.no_compile_layers.values()
               if isinstance(getattr(m, "impl", None), ConsaAttentionImpl) and m.impl.consa_pools is not None]
    for _, impl in entries:
        impl.precompiled = True
    if not query.is_cuda or not any(impl.ops.name == "triton" for _, impl in entries):
        return
    from consa_vllm.plugin.ops import AttnBatch
    from consa_vllm.plugin.ops.triton_cache import compile_in_parallel

    has_fa = any(impl.flash_attn is not None for _, impl in entries)
    shapes = batch_shapes(attn_metadata.scratch, attn_metadata.fused_max_seqs, has_fa)
    device = query.device
    metas = []
    for seqs, per_seq in shapes:
        starts = torch.arange(0, seqs + 1, dtype=torch.int32, device=device) * per_seq
        seq_lens = torch.full((seqs,), per_seq, dtype=torch.int32, device=device)
        batch = AttnBatch(query_start_loc=starts, seq_lens=seq_lens, max_query_len=per_seq, max_seq_len=per_seq)
        metas.append((seqs * per_seq, replace(attn_metadata, num_actual_tokens=seqs * per_seq, batch=batch)))

    def launches() -> None:
        for tokens, meta in metas:
            q, o, k, v = (like(x, tokens) for x in (query, output, key, value))
            for layer, impl in entries:
                full, sliding = impl.pools(layer, ctx, tokens)
                impl.ops.write_kv_hybrid(k, v, full, sliding)
                impl.attend(q, o, meta, full, sliding, flash_attn=no_flash_attn)

    try:
        count, seconds = compile_in_parallel(launches)
    except Exception as e:  # noqa: BLE001 - never stop an engine for a compile ahead
        logger.warning("consa_vllm: compiling the attention kernels ahead failed (%s: %s); each compiles at "
                       "its first launch instead (%s=0 skips this step)", type(e).__name__, e, ENV)
        return
    logger.info("consa_vllm: %d attention kernel variants compiled (or loaded from the cache) ahead in %.2f s "
                "(%d layers, %d batch shapes)",
                count, seconds, len(entries), len(shapes))
