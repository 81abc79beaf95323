"""ConSA variants of vLLM's own model classes, one per family of :mod:`consa_vllm.families`.

``ConsaQwen3MoeForCausalLM`` *is* vLLM's ``Qwen3MoeForCausalLM`` (a subclass built on
first use), with one change after vLLM has built it: each decoder layer's attention
module (``...self_attn.attn``, a vLLM ``Attention``) is replaced. Embeddings, decoder
layers, MLP and MoE blocks, norms, biases, rotary variants, torch.compile and weight
loading all stay vLLM's, so whatever vLLM's class loads and runs, the ConSA class does too.
LoRA stays vLLM's only where no KV head moves: adapters load apart from the checkpoint,
unpermuted, so the config check (:mod:`consa_vllm.plugin.config`) refuses ``--enable-lora``
when the loader reorders heads. The config check also refuses the vLLM features that the
replaced attention cannot honour (pipeline parallelism, a global sliding window,
dual-chunk attention).

- ``granularity: layer`` allocations with at least one F layer keep vLLM's stock
  ``Attention`` on F layers and get a stock ``Attention`` with a per-layer sliding window
  on S layers (stock kernels, stock KV specs);
- everything else (kv_head allocations, all-S models) gets the fused two-pool attention
  of :mod:`consa_vllm.plugin.attention` on every layer. Each layer's KV heads are
  permuted in the checkpoint tensors as they stream into vLLM's ``load_weights``
  (:mod:`consa_vllm.plugin.permute`), before vLLM's tensor-parallel loaders slice them,
  so that each rank gets its balanced share of the layer's heads with the F heads first
  (:mod:`consa_vllm.plugin.layout`).

The allocation is read from ``config.json["consa"]`` (written by ``consa-vllm export``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from functools import cache

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

from consa_vllm import families
from consa_vllm.allocation import Allocation
from consa_vllm.plugin.attention import ConsaAttention, ConsaKVPools
from consa_vllm.plugin.config import check_hybrid_kv_cache_manager, read_allocation
from consa_vllm.plugin.layout import PoolLayout, uses_pools
from consa_vllm.plugin.permute import permute_checkpoint_heads, quant_format

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handler shows it


def _decoder_attention(model: nn.Module, num_layers: int) -> dict[int, tuple[nn.Module, str, Attention]]:
    """Layer index -> (parent module, attribute name, vLLM ``Attention``) for every decoder layer."""
    found: dict[int, tuple[nn.Module, str, Attention]] = {}
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if type(child) is not Attention:  # exactly stock: our own subclasses are pools/compute
                continue
            layer = extract_layer_index(child.layer_name)
            if layer in found:
                raise ValueError(f"ConSA: two attention modules for layer {layer} "
                                 f"({found[layer][2].layer_name}, {child.layer_name})")
            found[layer] = (parent, attr, child)
    if sorted(found) != list(range(num_layers)):
        raise ValueError(f"ConSA: expected one attention module per decoder layer (0..{num_layers - 1}), "
                         f"found layers {sorted(found)}")
    return found


def _forget(vllm_config: VllmConfig, layer_name: str) -> None:
    # Attention registers itself by name for KV-cache binding and the forward context;
    # the replacement registers under the same name.
    del vllm_config.compilation_config.static_forward_context[layer_name]


def install_consa_attention(model: nn.Module, vllm_config: VllmConfig, allocation: Allocation,
                            prefix: str) -> ConsaKVPools | None:
    """Replace the attention module of every decoder layer of a freshly built vLLM model.

    Returns the KV pools (kv_head and all-S allocations) or None (stock modules only).
    """
    config = vllm_config.model_config.hf_config
    stock = _decoder_attention(model, allocation.num_layers)
    if not uses_pools(allocation):
        for layer, (parent, attr, old) in stock.items():
            if allocation.pattern[layer][0] == "F":
                continue  # vLLM's own module, untouched
            _forget(vllm_config, old.layer_name)
            setattr(parent, attr, Attention(
                old.num_heads, old.head_size, old.impl.scale, num_kv_heads=old.num_kv_heads,
                cache_config=vllm_config.cache_config, quant_config=old.quant_config,
                per_layer_sliding_window=allocation.window, prefix=old.layer_name))
        return None

    # Settled only now: a KV connector without hybrid support turns vLLM's hybrid KV-cache
    # manager off after the config hooks ran. (Pipeline parallelism, which would leave
    # this rank without some layers, was refused by the config check.)
    check_hybrid_kv_cache_manager(vllm_config, allocation)
    for _, _, old in stock.values():
        _forget(vllm_config, old.layer_name)
    # What balancing across tensor-parallel ranks moves and pads is logged once, by the
    # config check (consa_vllm.plugin.config), before any worker starts.
    layout = PoolLayout.build(allocation, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank())
    head_dim = stock[0][2].head_size
    # Pools first: the compute modules register as sharing their KV cache.
    pools = ConsaKVPools(layout, head_dim, vllm_config.cache_config, prefix=maybe_prefix(prefix, "consa_kv"))
    for layer, (parent, attr, old) in stock.items():
        if old.num_kv_heads != layout.kv_heads_per_rank:
            raise ValueError(f"ConSA: layer {layer} holds {old.num_kv_heads} KV heads per rank, expected "
                             f"{layout.kv_heads_per_rank} ({config.num_key_value_heads} "
                             f"heads over tensor-parallel size {layout.tp_size})")
        setattr(parent, attr, ConsaAttention(
            old.num_heads, old.head_size, old.impl.scale, old.num_kv_heads, layout.layers[layer], pools,
            vllm_config.cache_config, prefix=old.layer_name, quant_config=old.quant_config))
    _log_small_decode(layout, vllm_config)
    return pools


def _log_small_decode(layout: PoolLayout, vllm_config: VllmConfig) -> None:
    """One line per process: the layers whose small decode batches split (CONSA_SMALL_DECODE),
    so that a serving log says which path its batch-1 figures ran."""
    from consa_vllm.plugin.backend import FP8_KV_CACHE_DTYPES
    from consa_vllm.plugin.ops.flash_pools import (flash_attn_varlen, small_decode_mode, small_decode_split,
                                                   split_min_full_heads)

    if vllm_config.model_config.dtype not in (torch.float16, torch.bfloat16) or flash_attn_varlen() is None:
        return  # no FlashAttention 3 here: the fused kernel (GPU) or the torch op (CPU) runs every batch
    kv_fp8 = vllm_config.cache_config.cache_dtype in FP8_KV_CACHE_DTYPES
    max_len = vllm_config.model_config.max_model_len
    split = sum(lay.n_full > 0 and small_decode_split(kv_fp8, lay.n_full, max_model_len=max_len)
                for lay in layout.layers)
    logger.info("ConSA small decode (CONSA_SMALL_DECODE=%s, from %d F heads at max_model_len %d): F heads on "
                "FlashAttention 3 beside the fused kernel in %d of %d layers, the fused kernel alone in the rest",
                small_decode_mode(), split_min_full_heads(max_len), max_len, split, len(layout.layers))


class ConsaMixin:
    """Turns a vLLM model class into its ConSA variant (see the module docstring)."""

    consa_family: families.Family  # set by consa_model_class

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        allocation = read_allocation(vllm_config.model_config.hf_config, vllm_config.model_config.model)
        self.consa_allocation = allocation
        self.consa_hf_config = vllm_config.model_config.hf_config
        self.consa_quantization = vllm_config.model_config.quantization
        t0 = time.perf_counter()
        self.consa_kv = install_consa_attention(self, vllm_config, allocation, prefix)
        # One line per process: benchmarks/bench_serving.py attributes start-up time with it.
        logger.info("ConSA: attention installed on %d layers (%s) in %.3f s", allocation.num_layers,
                    "pools" if self.consa_kv is not None else "stock modules", time.perf_counter() - t0)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's own loading, with each layer's KV heads permuted into the served order first."""
        pools = self.consa_kv
        if pools is not None:
            orders = {lay.layer: lay.global_order for lay in pools.layout.layers if not lay.is_identity}
            if orders:
                c = self.consa_hf_config
                head_dim = self.consa_family.head_dim(c)
                # The config check (consa_vllm.plugin.config) already refused formats whose
                # tensors cannot follow the permutation, before any weight loaded.
                fmt = quant_format(getattr(c, "quantization_config", None), self.consa_quantization)
                # Time spent reading the checkpoint vs. inside the permutation, for the log line below.
                read_s, total_s = [0.0], [0.0]
                permuted = permute_checkpoint_heads(_timed(weights, read_s), orders, c.num_attention_heads,
                                                    c.num_key_value_heads, head_dim, quant=fmt)
                t0 = time.perf_counter()
                loaded = super().load_weights(_timed(permuted, total_s))
                logger.info("ConSA: load_weights with KV-head permutation of %d layers took %.3f s "
                            "(permutation %.3f s)", len(orders), time.perf_counter() - t0, total_s[0] - read_s[0])
                return loaded
        return super().load_weights(weights)


def _timed(items: Iterable, acc: list[float]) -> Iterator:
    """Yield ``items``, adding the time spent producing each one to ``acc[0]``."""
    it = iter(items)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            acc[0] += time.perf_counter() - t
            return
        acc[0] += time.perf_counter() - t
        yield item


@cache
def consa_model_class(architecture: str) -> type[nn.Module]:
    """The ConSA class for an exported architecture name (``ConsaQwen3MoeForCausalLM``)."""
    family = families.by_architecture(architecture)
    base = families.import_object(family.vllm_class)
    cls = type(family.consa_architecture, (ConsaMixin, base), {
        "__module__": __name__,
        "__qualname__": family.consa_architecture,
        "__doc__": f"vLLM's {base.__name__} with ConSA attention ({family.name} family).",
        "consa_family": family,
    })
    return cls


def __getattr__(name: str):
    # vLLM's registry imports "consa_vllm.plugin.models:<ConsaArch>" lazily; the class is
    # built on first use from the family registry, so no family is listed here.
    if name.startswith(families.ARCH_PREFIX):
        try:
            return consa_model_class(name)
        except families.UnsupportedFamilyError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
