"""Hybrid (full + sliding-window heads in one layer) paged attention ops.

Every op takes the same objects (:mod:`.interface`): a layer's slice of each KV pool as a
:class:`KVPool` (``None`` or ``num_heads == 0`` where the layer has no head in that pool)
and the batch shape as an :class:`AttnBatch`.

KV pool ("pool" = one KV-cache group): ``cache[num_blocks, 2, block_size, pool_heads, D]``,
dim 1 index 0 = K, 1 = V, possibly non-contiguous in dim 0. The F pool (full attention
heads) and the S pool (sliding-window heads, optionally with attention sinks) have their
own block size and block table. Both hold the model dtype, or both FP8 (``float8_e4m3fn``,
``K / k_scale`` and ``V / v_scale`` with the layer's scales split per pool).

``write_kv_hybrid(key, value, full, sliding)``
    key/value ``[T, n_full + n_sliding, D]``: heads ``[0, n_full)`` into the F pool, the
    rest into the S pool, each at its pool's ``slot_mapping`` (slot < 0 = padding, skipped).

``attention(query, output, batch, scale, full, sliding, scratch)``
    query/output ``[T, Hq, D]``, ``Hq = (n_full + n_sliding) * G``; query head ``h`` reads
    KV head ``h // G``; KV heads ``[0, n_full)`` are F heads, the rest S heads.
    ``batch.seq_lens`` include the new tokens, whose K/V must already be in the pools.
    ``scratch`` is the split-KV decode scratch of the Triton op (ignored by the torch op).

Implementations: :mod:`.torch_paged` (CPU, and the reference), :mod:`.triton_hybrid`
(GPU), and for prefill and large decode batches on Hopper :mod:`.flash_pools`
(FlashAttention 3 per pool), chosen by the backend. The Triton kernels compile into a cache
folder shared by every engine (:mod:`.triton_cache`), not vLLM's folder of each configuration,
and an engine compiles the variants it needs ahead, in parallel, at its first step
(:mod:`consa_vllm.plugin.precompile`).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from .interface import AttnBatch, KVPool

__all__ = ["AttnBatch", "HybridOps", "KVPool", "select_ops"]


class HybridOps(NamedTuple):
    """The K/V-write and attention functions of one implementation (see the module doc)."""

    name: str
    write_kv_hybrid: Callable
    attention: Callable


def select_ops(device_type: str) -> HybridOps:
    """The implementation for a device: Triton on CUDA, torch elsewhere.

    ``CONSA_ATTN_IMPL=torch|triton|auto`` overrides the choice (to compare them). The
    backend calls this once per layer when vLLM builds the model, not per forward call.
    """
    impl = os.environ.get("CONSA_ATTN_IMPL", "auto").strip().lower() or "auto"
    if impl not in ("torch", "triton", "auto"):
        raise ValueError(f"CONSA_ATTN_IMPL must be torch, triton or auto, got {impl!r}")
    if impl == "triton" or (impl == "auto" and device_type == "cuda"):
        from . import triton_hybrid

        return HybridOps("triton", triton_hybrid.write_kv_hybrid, triton_hybrid.hybrid_paged_attention)
    from . import torch_paged

    def attention(query, output, batch, scale, full, sliding, scratch=None) -> None:
        torch_paged.hybrid_paged_attention(query, output, batch, scale, full, sliding)

    return HybridOps("torch", torch_paged.write_kv_hybrid, attention)
