"""vLLM attention modules of a ConSA model: the two KV pools and the per-layer compute.

See :mod:`consa_vllm.plugin.layout` for where heads live and
:mod:`consa_vllm.plugin.backend` for how a layer is computed.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from vllm.config import CacheConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from consa_vllm.plugin.backend import ConsaAttentionBackend
from consa_vllm.plugin.layout import LayerLayout, PoolLayout, choose_block_sizes
from consa_vllm.plugin.sink_kv import SinkSlidingWindowSpec

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handler shows it


def _load_served_head_scales(param: torch.Tensor, loaded: torch.Tensor, *, kv_heads: tuple[int, ...], group: int,
                             kind: str) -> None:
    param.data.copy_(served_head_scales(loaded, kv_heads, group, kind).to(param.dtype))


class ConsaKVPool(Attention):
    """Owns the KV memory of all F heads (or all S heads) of the model on this rank.

    vLLM never runs it: it exists so that the hybrid KV-cache manager allocates (and,
    for the S pool, frees out-of-window) blocks for these heads. An S pool with
    attention sinks (``sink > 0``) reports a :class:`SinkSlidingWindowSpec`, whose
    manager keeps each sequence's sink blocks.
    """

    def __init__(self, head_size: int, pool_heads: int, window: int | None, block_size: int,
                 page_tokens_heads: int, cache_config: CacheConfig | None, prefix: str, sink: int = 0):
        super().__init__(num_heads=pool_heads, head_size=head_size, scale=1.0, num_kv_heads=pool_heads,
                         cache_config=cache_config, per_layer_sliding_window=window, prefix=prefix,
                         attn_backend=ConsaAttentionBackend)
        self.consa_block_size = block_size
        self.consa_page_tokens_heads = page_tokens_heads
        self.consa_sink = sink

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        spec = super().get_kv_cache_spec(vllm_config)
        assert spec is not None
        common = dict(block_size=self.consa_block_size, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                      head_size_v=self.head_size_v, dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode)
        if self.sliding_window is None:
            base = FullAttentionSpec(**common)
        elif self.consa_sink:
            base = SinkSlidingWindowSpec(**common, sliding_window=self.sliding_window, sink=self.consa_sink)
        else:
            base = SlidingWindowSpec(**common, sliding_window=self.sliding_window)
        # Both pools get the same page (the smaller one padded, see choose_block_sizes).
        per_head_token = base.page_size_bytes // (self.consa_block_size * self.num_kv_heads)
        page = self.consa_page_tokens_heads * per_head_token
        if page != base.page_size_bytes:
            base = replace(base, page_size_padded=page)
        return base


class ConsaKVPools(nn.Module):
    """The F pool and the S pool. Created before the decoder layers that share them."""

    def __init__(self, layout: PoolLayout, head_size: int, cache_config: CacheConfig | None,
                 prefix: str):
        super().__init__()
        self.layout = layout
        base = cache_config.block_size if cache_config is not None and cache_config.block_size else 16
        block_f, block_s, page = choose_block_sizes(layout.full_pool_heads, layout.sliding_pool_heads, base)
        window = layout.window
        # vLLM derives a layer index from the single integer in each attention layer's name.
        self.full_name = f"{prefix}.0.full" if layout.full_pool_heads else None
        self.sliding_name = f"{prefix}.0.sliding" if layout.sliding_pool_heads else None
        if layout.full_pool_heads:
            self.full = ConsaKVPool(head_size, layout.full_pool_heads, None, block_f, page, cache_config,
                                    self.full_name)
        if layout.sliding_pool_heads:
            self.sliding = ConsaKVPool(head_size, layout.sliding_pool_heads, window, block_s, page, cache_config,
                                       self.sliding_name, sink=layout.sink)
        # Pool sizes are the same on every tensor-parallel rank; a rank may leave a slot
        # unused (layout.balance_heads) so that vLLM sees identical KV cache specs.
        logger.info("ConSA KV pools: %d F heads (block %d), %d S heads (block %d, window %d, sink %d); "
                    "rank %d of %d uses %d F + %d S", layout.full_pool_heads, block_f,
                    layout.sliding_pool_heads, block_s, window, layout.sink, layout.tp_rank, layout.tp_size,
                    layout.full_used, layout.sliding_used)

    @property
    def primary_name(self) -> str:
        """The pool whose metadata the compute modules receive (F if there is one)."""
        return self.full_name or self.sliding_name


def served_head_scales(loaded: torch.Tensor, kv_heads: tuple[int, ...], group: int, kind: str) -> torch.Tensor:
    """This rank's per-KV-head scales in served order, from a checkpoint's per-head scales.

    ``loaded`` holds one scale per KV head of the layer (``k``/``v``) or per query head
    (``q``, reduced to its KV head by the maximum over the group, as vLLM does for
    FlashAttention), in checkpoint order; ``kv_heads`` are this rank's KV heads as
    checkpoint indices in served order (:attr:`LayerLayout.kv_heads`: F heads first).
    """
    loaded = loaded.flatten()
    if kind == "q":
        if loaded.numel() % group:
            raise ValueError(f"q_scale: {loaded.numel()} values do not split into groups of {group} query heads")
        loaded = loaded.view(-1, group).amax(dim=1)
    if max(kv_heads) >= loaded.numel():
        raise ValueError(f"{kind}_scale: {loaded.numel()} per-head values, KV head {max(kv_heads)} needed")
    return loaded[torch.tensor(kv_heads, dtype=torch.long, device=loaded.device)]


class ConsaAttention(Attention):
    """Computes one decoder layer's attention over its F and S heads in one launch.

    Query heads arrive permuted so that the layer's F KV heads (and their query groups)
    come first; see :meth:`consa_vllm.plugin.models.ConsaForCausalLM.load_weights`.

    With an FP8 KV cache this module owns its layer's scales (vLLM's ``_k_scale``,
    ``_v_scale``, ``_q_scale``: from the checkpoint through ``quant_config``, else 1.0);
    the attention backend splits them with the heads into the F and S pools' parts.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 layer: LayerLayout, pools: ConsaKVPools, cache_config: CacheConfig | None, prefix: str,
                 quant_config: QuantizationConfig | None = None):
        super().__init__(num_heads=num_heads, head_size=head_size, scale=scale, num_kv_heads=num_kv_heads,
                         cache_config=cache_config, quant_config=quant_config, prefix=prefix,
                         attn_backend=ConsaAttentionBackend, kv_sharing_target_layer_name=pools.primary_name,
                         consa_pools=(pools.full_name, pools.sliding_name, layer))
        self.consa_window = pools.layout.window
        self.consa_sink = pools.layout.sink
        # Per-head scales (compressed-tensors "attn_head" KV schemes) follow the head
        # permutation: vLLM's own loader would take this rank's natural head range instead.
        for kind in ("k", "v", "q"):
            param = getattr(self, f"{kind}_scale", None)
            if isinstance(param, torch.Tensor) and param.numel() > 1:
                param.weight_loader = partial(_load_served_head_scales, kv_heads=layer.kv_heads,
                                              group=num_heads // num_kv_heads, kind=kind)
