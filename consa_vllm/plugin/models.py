"""ConSA variants of vLLM's Llama-family models (Qwen3, Qwen2, Llama, Mistral).

The decoder is vLLM's own (``Qwen2Model``: embeddings, layer stack, norm, weight
mapping); only the attention of each layer differs:

- ``granularity: layer`` allocations with at least one F layer use vLLM's stock
  ``Attention`` with a per-layer sliding window (stock kernels, stock KV specs);
- everything else (kv_head allocations, all-S models) uses the fused two-pool attention
  of :mod:`consa_vllm.plugin.attention`. Each layer's KV heads are permuted in the
  checkpoint tensors at load time (:func:`permute_checkpoint_heads`), before vLLM's
  tensor-parallel loaders slice them, so that each rank gets its balanced share of the
  layer's heads (:mod:`consa_vllm.plugin.layout`) with the F heads first.

The allocation is read from ``config.json["consa"]`` (written by ``consa-vllm export``).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2MLP, Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, PPMissingLayer, extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

from consa_vllm.allocation import Allocation
from consa_vllm.plugin.attention import ConsaAttention, ConsaKVPools
from consa_vllm.plugin.config import read_allocation
from consa_vllm.plugin.layout import LayerLayout, PoolLayout
from consa_vllm.plugin.permute import permute_checkpoint_heads, quant_format

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handler shows it


def uses_pools(allocation: Allocation) -> bool:
    """Whether the fused two-pool attention serves this allocation (else stock modules)."""
    has_full = any("F" in row for row in allocation.pattern)
    # Layer allocations map to stock per-layer windows, except all-S ones: with no
    # full-attention group to unify block sizes against, stock CPU attention crashes.
    return allocation.granularity == "kv_head" or not has_full


class ConsaSelfAttention(nn.Module):
    """Llama/Qwen attention (optional q/k RMSNorm, optional qkv bias) with ConSA heads."""

    def __init__(self, config, allocation: Allocation, pools: ConsaKVPools | None,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        tp = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_kv_heads % tp or self.total_num_heads % tp:
            raise ValueError(f"ConSA needs attention heads ({self.total_num_heads}) and KV heads "
                             f"({self.total_num_kv_heads}) divisible by tensor-parallel size {tp}")
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = self.total_num_kv_heads // tp
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim ** -0.5

        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.total_num_heads,
                                          self.total_num_kv_heads, bias=qkv_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None))
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

        self.layout: LayerLayout | None = None
        if pools is None:
            full = allocation.pattern[layer_idx][0] == "F"
            self.attn = Attention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                                  cache_config=cache_config, quant_config=quant_config,
                                  per_layer_sliding_window=None if full else allocation.window,
                                  prefix=f"{prefix}.attn")
        else:
            self.layout = pools.layout.layers[layer_idx]
            self.attn = ConsaAttention(self.num_heads, self.head_dim, self.scaling, self.num_kv_heads,
                                       self.layout, pools, cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        out, _ = self.o_proj(out)
        return out


class ConsaDecoderLayer(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 allocation: Allocation, pools: ConsaKVPools | None, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.self_attn = ConsaSelfAttention(config, allocation, pools, cache_config, quant_config,
                                            prefix=f"{prefix}.self_attn", qk_norm=qk_norm, qkv_bias=qkv_bias)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class ConsaModel(Qwen2Model):
    """vLLM's Qwen2 decoder stack with ConSA attention layers and the shared KV pools."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", qk_norm: bool, qkv_bias: bool):
        config = vllm_config.model_config.hf_config
        allocation = read_allocation(config, vllm_config.model_config.model)
        if get_pp_group().world_size > 1:
            raise NotImplementedError("ConSA models do not support pipeline parallelism yet; use tensor parallelism")
        pools = None
        if uses_pools(allocation):
            # What balancing across tensor-parallel ranks moves and pads is logged once, by
            # the config check (consa_vllm.plugin.config), before any worker starts.
            layout = PoolLayout.build(allocation, get_tensor_model_parallel_world_size(),
                                      get_tensor_model_parallel_rank())
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            # Pools are built first: the layers register as sharing their KV cache.
            pools = ConsaKVPools(layout, head_dim, vllm_config.cache_config, prefix=f"{prefix}.consa_kv",
                                 max_model_len=vllm_config.model_config.max_model_len)
        layer = partial(ConsaDecoderLayer, allocation=allocation, pools=pools, qk_norm=qk_norm, qkv_bias=qkv_bias)
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=layer)
        self.consa_kv = pools
        self.allocation = allocation


class ConsaForCausalLM(nn.Module, SupportsPP):
    """Common causal-LM head; subclasses only choose the attention flavour."""

    qk_norm: bool = False
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.vllm_quantization = vllm_config.model_config.quantization
        self.model = ConsaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                qk_norm=self.qk_norm, qkv_bias=self.qkv_bias(config))
        if get_pp_group().is_last_rank:
            if config.tie_word_embeddings:
                self.lm_head = self.model.embed_tokens
            else:
                self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                              quant_config=self.quant_config, prefix=maybe_prefix(prefix, "lm_head"))
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    @staticmethod
    def qkv_bias(config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF checkpoint tensors, KV heads permuted into the served order first."""
        pools = self.model.consa_kv
        if pools is not None:
            orders = {lay.layer: lay.global_order for lay in pools.layout.layers if not lay.is_identity}
            if orders:
                c = self.config
                head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                # The config check (consa_vllm.plugin.config) already refused formats whose
                # tensors cannot follow the permutation, before any weight loaded.
                fmt = quant_format(getattr(c, "quantization_config", None), self.vllm_quantization)
                weights = permute_checkpoint_heads(weights, orders, c.num_attention_heads,
                                                   c.num_key_value_heads, head_dim, quant=fmt)
        loader = AutoWeightsLoader(self, skip_prefixes=(["lm_head."] if self.config.tie_word_embeddings else None))
        return loader.load_weights(weights)  # ConsaModel (Qwen2Model) maps q/k/v -> qkv_proj


class ConsaQwen3ForCausalLM(ConsaForCausalLM):
    qk_norm = True


class ConsaQwen2ForCausalLM(ConsaForCausalLM):
    @staticmethod
    def qkv_bias(config) -> bool:
        return True


class ConsaLlamaForCausalLM(ConsaForCausalLM):
    pass


class ConsaMistralForCausalLM(ConsaForCausalLM):
    pass
