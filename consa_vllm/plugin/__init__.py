"""The vLLM general plugin ``consa``.

vLLM imports this module and calls :func:`register` in every process it starts (API
server, engine core, workers, the registry's inspection subprocess), so it must stay
cheap and idempotent: the model code is registered by name and imported lazily.
"""

from __future__ import annotations

# Architecture name in config.json -> "module:Class" (vLLM imports it lazily).
CONSA_ARCHITECTURES: dict[str, str] = {
    "ConsaQwen3ForCausalLM": "consa_vllm.plugin.models:ConsaQwen3ForCausalLM",
    "ConsaLlamaForCausalLM": "consa_vllm.plugin.models:ConsaLlamaForCausalLM",
    "ConsaQwen2ForCausalLM": "consa_vllm.plugin.models:ConsaQwen2ForCausalLM",
    "ConsaMistralForCausalLM": "consa_vllm.plugin.models:ConsaMistralForCausalLM",
}


def register() -> None:
    """Register the ConSA model classes, their config checks and KV-cache spec with vLLM."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from consa_vllm.endpoint import engine as endpoint_engine
    from consa_vllm.plugin.config import ConsaModelConfig
    from consa_vllm.plugin.sink_kv import register_sink_kv_cache_spec

    supported = ModelRegistry.get_supported_archs()
    for arch, target in CONSA_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
        # Validates the allocation while vLLM builds its config: before any weights load.
        MODELS_CONFIG_MAP.setdefault(arch, ConsaModelConfig)
    # The S pool's KV-cache spec with attention sinks and its block manager: the scheduler
    # (engine-core process) looks the manager up by spec type.
    register_sink_kv_cache_spec()
    # Engine-core side of /v1/consa/* (the consa_endpoint plugin): per-pool KV block counts.
    endpoint_engine.install()
