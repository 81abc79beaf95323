"""vLLM attention modules of a ConSA model: the two KV pools and the per-layer compute.

See :mod:`consa_vllm.plugin.layout` for where heads live and
:mod:`consa_vllm.plugin.backend` for how a layer is computed.
"""

from __future__ import annotations

from dataclasses import replace

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
        self.consa_window = window
        self.consa_block_size = block_size
        self.consa_page_tokens_heads = page_tokens_heads
        self.consa_sink = sink

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        if self.sliding_window != self.consa_window:
            # vLLM gives a module built without a window cache_config.sliding_window, which
            # would make the F pool sliding; the config check refuses such configs.
            raise ValueError(f"ConSA: KV pool {self.layer_name} has sliding window {self.sliding_window}, expected "
                             f"{self.consa_window} (a global sliding window in the model's config?)")
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
    """The F pool and the S pool. Created once vLLM has built the decoder layers, before the
    ConSA compute modules that share them (which name a pool as their KV-cache target)."""

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


class ConsaAttention(Attention):
    """Computes one decoder layer's attention over its F and S heads in one launch.

    Query heads arrive permuted so that the layer's F KV heads (and their query groups)
    come first; see :meth:`consa_vllm.plugin.models.ConsaMixin.load_weights`.

    With an FP8 KV cache this module owns its layer's scales (vLLM's ``_k_scale``,
    ``_v_scale``, ``_q_scale``: from the checkpoint through ``quant_config`` and vLLM's own
    loaders, else 1.0); the attention backend splits them with the heads into the F and S
    pools' parts. Per-KV-head scales (compressed-tensors ``attn_head`` schemes) load in
    checkpoint order, which is the served order: the config check refuses them wherever a
    layer's heads move (:func:`consa_vllm.plugin.permute.check_quantized_permutation`).
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
