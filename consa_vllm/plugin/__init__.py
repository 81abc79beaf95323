"""The vLLM general plugin ``consa``.

vLLM imports this module and calls :func:`register` in every process it starts (API
server, engine core, workers, the registry's inspection subprocess), so it must stay
cheap and idempotent: the model code is registered by name and imported lazily.
"""

from __future__ import annotations

from consa_vllm.families import consa_architectures


def register() -> None:
    """Register the ConSA model classes, their config checks and KV-cache spec with vLLM."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from consa_vllm.endpoint import engine as endpoint_engine
    from consa_vllm.families import FAMILIES
    from consa_vllm.plugin.config import ConsaModelConfig, StockFamilyConfig
    from consa_vllm.plugin.sink_kv import register_sink_kv_cache_spec

    supported = ModelRegistry.get_supported_archs()
    for arch, target in consa_architectures().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
        # Validates the allocation while vLLM builds its config: before any weights load.
        MODELS_CONFIG_MAP.setdefault(arch, ConsaModelConfig)
    for family in FAMILIES:
        # Only where vLLM has no hook of its own for the plain architecture.
        MODELS_CONFIG_MAP.setdefault(family.hf_architecture, StockFamilyConfig)
    # The S pool's KV-cache spec with attention sinks and its block manager: the scheduler
    # (engine-core process) looks the manager up by spec type.
    register_sink_kv_cache_spec()
    # Engine-core side of /v1/consa/* (the consa_endpoint plugin): per-pool KV block counts.
    endpoint_engine.install()
