"""Hybrid (full + sliding-window heads in one layer) paged attention ops.

Contract (the consa vLLM backend calls exactly these):

KV pool ("pool" = one KV-cache group): ``cache[num_blocks, 2, block_size, pool_heads, D]``,
dim 1 index 0 = K, 1 = V, possibly non-contiguous in dim 0.  A layer's heads are the
contiguous range ``[head_offset, head_offset + n)`` of its pool.  The F pool (full
attention heads) and the S pool (sliding-window heads) have their own block size and
block table.

``write_kv(key, value, cache, slot_mapping, head_offset)``
    key/value [T, n, D] -> cache[slot // B, 0/1, slot % B, head_offset:head_offset + n];
    slot < 0 = padding (skipped).

``write_kv_hybrid(key, value, n_full, full_cache, full_slot_mapping, full_head_offset,
        swa_cache, swa_slot_mapping, swa_head_offset)``
    a layer's heads ``[0, n_full)`` into the F pool and the rest into the S pool.

``hybrid_paged_attention(query, output, query_start_loc, seq_lens, scale,
        full_cache, full_block_table, full_head_offset, n_full,
        swa_cache, swa_block_table, swa_head_offset, n_swa,
        window, max_query_len, max_seq_len, *, scratch=None, seq_threshold_3d=None)``
    query/output [T, Hq, D], Hq = (n_full + n_swa) * G; q head i -> kv head i // G, kv
    heads [0, n_full) are F heads (F pool), the rest S heads (S pool).  seq_lens include
    the new tokens.  F: causal; S: keys i - W + 1 .. i.  KV of the new tokens must already
    be in the caches.  Keyword-only extras are used by the Triton path only (see
    ``triton_hybrid.make_hybrid_scratch``) and ignored by the torch path.

Dispatch: Triton for CUDA tensors, torch otherwise.  ``CONSA_ATTN_IMPL=torch|triton``
forces one (read at every call, so tests can flip it).
"""

from __future__ import annotations

import os

from .torch_paged import hybrid_paged_attention as torch_hybrid_paged_attention
from .torch_paged import write_kv as torch_write_kv

__all__ = [
    "hybrid_paged_attention",
    "write_kv",
    "write_kv_hybrid",
    "torch_hybrid_paged_attention",
    "torch_write_kv",
    "use_triton",
]


def use_triton(t) -> bool:
    """True when the Triton implementation should run for tensor ``t``."""
    impl = os.environ.get("CONSA_ATTN_IMPL", "").strip().lower()
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    if impl not in ("", "auto"):
        raise ValueError(f"CONSA_ATTN_IMPL must be torch, triton or auto, got {impl!r}")
    return t.is_cuda


def write_kv(key, value, cache, slot_mapping, head_offset: int) -> None:
    if use_triton(cache):
        from .triton_hybrid import write_kv as impl
    else:
        impl = torch_write_kv
    impl(key, value, cache, slot_mapping, head_offset)


def write_kv_hybrid(key, value, n_full: int, full_cache, full_slot_mapping, full_head_offset: int,
                    swa_cache, swa_slot_mapping, swa_head_offset: int) -> None:
    """A layer's K/V [T, n_full + n_swa, D]: the first n_full heads into the F pool, the
    rest into the S pool (one launch on GPU; two ``write_kv`` calls in torch)."""
    if use_triton(key):
        from .triton_hybrid import write_kv_hybrid as impl

        impl(key, value, n_full, full_cache, full_slot_mapping, full_head_offset,
             swa_cache, swa_slot_mapping, swa_head_offset)
        return
    if n_full:
        torch_write_kv(key[:, :n_full], value[:, :n_full], full_cache, full_slot_mapping, full_head_offset)
    if key.shape[1] > n_full:
        torch_write_kv(key[:, n_full:], value[:, n_full:], swa_cache, swa_slot_mapping, swa_head_offset)


def hybrid_paged_attention(
    query, output, query_start_loc, seq_lens, scale,
    full_cache, full_block_table, full_head_offset, n_full,
    swa_cache, swa_block_table, swa_head_offset, n_swa,
    window, max_query_len, max_seq_len, **kwargs,
) -> None:
    if use_triton(query):
        from .triton_hybrid import hybrid_paged_attention as impl
    else:
        impl = torch_hybrid_paged_attention
    impl(query, output, query_start_loc, seq_lens, scale,
         full_cache, full_block_table, full_head_offset, n_full,
         swa_cache, swa_block_table, swa_head_offset, n_swa,
         window, max_query_len, max_seq_len, **kwargs)
