"""Reference hybrid (full / sliding-window) attention for Hugging Face transformers.

The numerical reference for the vLLM plugin and the attention engine of the trainer::

    from consa_vllm.reference import patch_model
    state = patch_model(model, window=4096, allocation=alloc)   # binary F/S per KV head
    state.set_gates(z)        # z [num_layers, num_kv_heads]: z*FA + (1-z)*SWA, differentiable
    state.set_gates(None)     # back to the allocation
    state.disable(); state.enable()
    unpatch_model(model)

Imports torch at module load (transformers and pydantic only when patching): not for the vLLM
plugin's import path. Its speed and memory are measured by ``benchmarks/bench_reference_attention.py``.
"""

from .kernels import band_mask, full_attention, hybrid_attention, sliding_attention
from .patch import ATTN_NAME, HybridAttentionState, consa_attention_forward, patch_model, unpatch_model

__all__ = [
    "patch_model", "unpatch_model", "HybridAttentionState", "ATTN_NAME", "consa_attention_forward",
    "hybrid_attention", "full_attention", "sliding_attention", "band_mask",
]
