"""FlashAttention 3 over the two KV pools: the GPU path for prefill and large decode batches.

There the work per launch is large and FlashAttention 3 beats the fused Triton kernel
(benchmarks/results/hybrid_kernel_h100*.json), but FlashAttention takes one block table
and one window per call, so a hybrid layer costs two launches: F heads over the F pool
(causal), S heads over the S pool (sliding window).

Run back to back, the two launches each end in a partly idle wave. At a decode batch B
the F launch has only B x n_full work tiles (FlashAttention packs a KV head's query heads
into one tile), so e.g. 2 F heads at B = 88 give 176 tiles for 132 SMs: a second wave a
third full. ``overlap=True`` (the default) runs the F launch on vLLM's auxiliary stream
concurrently with the S launch, so S tiles fill the F launch's idle SMs, as one fused
launch would. CUDA-graph capture records the two streams as parallel branches.

``CONSA_FA3_OVERLAP=0`` runs the launches one after the other (read once per process), to
measure what the overlap buys. Forcing KV splits on the F launch (``f_splits``) was
measured too and changed nothing on the H100
(benchmarks/results/hybrid_kernel_h100_fa3_pools.json), so the server leaves the split
count to FlashAttention.
"""

from __future__ import annotations

import os

import torch


def flash_attn_varlen():
    """vLLM's FlashAttention 3 varlen function on Hopper GPUs, else None (use the fused kernel)."""
    if os.environ.get("CONSA_PREFILL_IMPL", "auto") == "fused" or not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func if get_flash_attn_version() == 3 else None


def default_overlap() -> bool:
    """Whether F and S launches run on two streams (``CONSA_FA3_OVERLAP``, default on)."""
    v = os.environ.get("CONSA_FA3_OVERLAP", "1").strip().lower()
    if v not in ("0", "1", "true", "false"):
        raise ValueError(f"CONSA_FA3_OVERLAP must be 0 or 1, got {v!r}")
    return v in ("1", "true")


def flash_attn_pools(fa, query, output, query_start_loc, seq_lens, max_query_len, max_seq_len, scale,
                     full_cache, full_block_table, full_head_offset, n_full,
                     swa_cache, swa_block_table, swa_head_offset, n_swa, window,
                     *, overlap: bool = True, f_splits: int = 0) -> None:
    """One hybrid layer through FlashAttention 3 (same contract as ``hybrid_paged_attention``).

    ``fa`` is :func:`flash_attn_varlen`'s function. Query heads ``[0, n_full * G)`` attend
    over the F pool, the rest over the S pool with keys ``i - window + 1 .. i``.
    ``f_splits`` > 0 forces that many KV splits on the F launch (the kernel benchmark's
    variant; 0 leaves it to FlashAttention).
    """
    g = query.shape[1] // (n_full + n_swa)
    split = n_full * g
    calls = []
    for cache, table, off, nh, sl, win, splits in (
        (full_cache, full_block_table, full_head_offset, n_full, slice(0, split), (-1, -1), f_splits),
        (swa_cache, swa_block_table, swa_head_offset, n_swa, slice(split, None), (window - 1, 0), 0),
    ):
        if nh:
            calls.append(dict(
                q=query[:, sl], k=cache[:, 0, :, off:off + nh], v=cache[:, 1, :, off:off + nh],
                out=output[:, sl], cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
                seqused_k=seq_lens, max_seqlen_k=max_seq_len, softmax_scale=scale, causal=True,
                window_size=list(win), block_table=table, num_splits=splits, fa_version=3))
    if len(calls) == 2 and overlap:
        # ``fa`` comes from vLLM, so vLLM is importable here. Its aux_stream() is the one side
        # stream vLLM shares among its own overlaps. torch's current stream, not vLLM's
        # cached one: that cache is only set up in vLLM's workers, and this also runs in
        # the kernel benchmark.
        from vllm.utils.torch_utils import aux_stream

        main, side = torch.cuda.current_stream(), aux_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fa(**calls[0])  # F heads: the long launch starts first
        fa(**calls[1])
        # Tensors made before the fork are used again only after this join, and
        # FlashAttention's own buffers are allocated on the side stream itself, so no
        # record_stream is needed.
        main.wait_stream(side)
        return
    for c in calls:
        fa(**c)
