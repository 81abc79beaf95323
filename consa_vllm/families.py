"""The model families consa-vllm serves, trains and exports: one row per family.

This is the only place that names a family. The exporter, the vLLM plugin, the reference
attention, the trainer and the tiny-model builder all read it (a test checks that no
other module of the package names one). Adding a family is one row here plus its tests.

A row says, for one Hugging Face architecture:

- ``hf_architecture`` / ``model_type``: how a Hugging Face ``config.json`` names it;
- ``vllm_class``: vLLM's own model class (``module:Class``) that the plugin builds. The
  plugin replaces only each layer's attention module; decoder layers, MLP and MoE blocks,
  norms, biases, rotary variants and weight loading stay vLLM's;
- ``hf_attention``: the transformers attention class (``module:Class``) whose modules the
  reference attention drives (:mod:`consa_vllm.reference.patch`);
- ``consa_architecture``: the architecture name an exported checkpoint carries, which
  the plugin registers with vLLM;
- ``sliding_window_default``: whether the HF config class defaults ``sliding_window`` to a
  number when the key is absent (the exporter must then write ``null`` explicitly);
- ``head_dim_from_hidden``: vLLM's class ignores a ``head_dim`` field and uses
  ``hidden_size // num_attention_heads`` (:meth:`Family.head_dim`, the plugin's one rule);
- ``tiny``: extra config fields of a tiny random model of the family (tests, demo);
- ``experts_field``: the HF config field that counts a mixture-of-experts family's routed
  experts (empty: a dense family). The plugin reads it to keep Inductor from padding the
  router's logits (:func:`consa_vllm.plugin.config.guard_router_padding`).

Pure Python, no torch or vLLM import: vLLM's plugin loader imports this in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ARCH_PREFIX = "Consa"


@dataclass(frozen=True)
class Family:
    """One supported model family (see the module docstring for the fields)."""

    name: str
    hf_architecture: str
    model_type: str
    vllm_class: str
    hf_attention: str
    sliding_window_default: bool = False
    head_dim_from_hidden: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)
    experts_field: str = ""

    @property
    def consa_architecture(self) -> str:
        """``Qwen3ForCausalLM`` -> ``ConsaQwen3ForCausalLM``."""
        return ARCH_PREFIX + self.hf_architecture

    @property
    def is_moe(self) -> bool:
        """Whether the family's MLPs are mixture-of-experts blocks."""
        return bool(self.experts_field)

    def head_dim(self, config: Any) -> int:
        """The head size vLLM's class builds for an HF config object of this family."""
        if not self.head_dim_from_hidden and getattr(config, "head_dim", None):
            return int(config.head_dim)
        return config.hidden_size // config.num_attention_heads


_T = "transformers.models"
_V = "vllm.model_executor.models"

FAMILIES: tuple[Family, ...] = (
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", f"{_V}.qwen3:Qwen3ForCausalLM",
           f"{_T}.qwen3.modeling_qwen3:Qwen3Attention", sliding_window_default=True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", f"{_V}.qwen2:Qwen2ForCausalLM",
           f"{_T}.qwen2.modeling_qwen2:Qwen2Attention", sliding_window_default=True,
           head_dim_from_hidden=True),
    Family("llama", "LlamaForCausalLM", "llama", f"{_V}.llama:LlamaForCausalLM",
           f"{_T}.llama.modeling_llama:LlamaAttention"),
    Family("mistral", "MistralForCausalLM", "mistral", f"{_V}.mistral:MistralForCausalLM",
           f"{_T}.mistral.modeling_mistral:MistralAttention", sliding_window_default=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", f"{_V}.qwen3_moe:Qwen3MoeForCausalLM",
           f"{_T}.qwen3_moe.modeling_qwen3_moe:Qwen3MoeAttention", sliding_window_default=True,
           tiny={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                 "norm_topk_prob": True}, experts_field="num_experts"),
    Family("mixtral", "MixtralForCausalLM", "mixtral", f"{_V}.mixtral:MixtralForCausalLM",
           f"{_T}.mixtral.modeling_mixtral:MixtralAttention",
           tiny={"num_local_experts": 4, "num_experts_per_tok": 2}, experts_field="num_local_experts"),
)

#: The family of the demo and of tiny models when none is named.
DEFAULT_FAMILY = FAMILIES[0].name

_BY_NAME = {f.name: f for f in FAMILIES}
_BY_ARCH = {f.hf_architecture: f for f in FAMILIES}
_BY_CONSA_ARCH = {f.consa_architecture: f for f in FAMILIES}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


class UnsupportedFamilyError(ValueError):
    """A model whose family is not in :data:`FAMILIES`; the message lists the supported ones."""


def supported_summary() -> str:
    """``Qwen3ForCausalLM (qwen3), ...``: what the refusals list."""
    return ", ".join(f"{f.hf_architecture} ({f.model_type})" for f in FAMILIES)


def family_names() -> tuple[str, ...]:
    """Short names of the supported families, registry order."""
    return tuple(_BY_NAME)


def hf_architectures() -> tuple[str, ...]:
    """HF architecture names of the supported families, registry order."""
    return tuple(_BY_ARCH)


def by_name(name: str) -> Family:
    """The family called ``name`` (``qwen3``, ``qwen3_moe``, ...)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedFamilyError(
            f"unknown model family {name!r}; supported: {', '.join(_BY_NAME)}") from None


def by_architecture(arch: str, where: str = "config.json") -> Family:
    """The family of an HF architecture name or of its exported ``Consa*`` name."""
    fam = _BY_ARCH.get(arch) or _BY_CONSA_ARCH.get(arch)
    if fam is None:
        raise UnsupportedFamilyError(
            f"{where}: architecture {arch!r} is not supported by consa-vllm; supported: {supported_summary()}")
    return fam


def by_model_type(model_type: str | None, where: str = "config.json") -> Family:
    """The family of an HF ``model_type``."""
    fam = _BY_MODEL_TYPE.get(model_type or "")
    if fam is None:
        raise UnsupportedFamilyError(
            f"{where}: model_type {model_type!r} is not supported by consa-vllm; supported: {supported_summary()}")
    return fam


def consa_architectures() -> dict[str, str]:
    """Exported architecture name -> ``module:Class`` that vLLM imports lazily."""
    return {f.consa_architecture: f"consa_vllm.plugin.models:{f.consa_architecture}" for f in FAMILIES}


def import_object(path: str) -> Any:
    """Import ``module:attr`` (the registry's class references)."""
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
