"""Evaluation: held-out LM loss by distance beyond the window, long-context retrieval, KV footprint.

- :mod:`.tasks`: synthetic passkey and key-value retrieval prompts (and training documents),
  deterministic by seed, on any tokenizer;
- :mod:`.metrics`: the metrics through the reference hybrid attention (HF transformers);
- :mod:`.vllm_client`: the same metrics for a model served by vLLM (OpenAI API);
- :mod:`.cli`: ``consa-vllm eval`` (``python -m consa_vllm.eval``).

torch and transformers are imported lazily (inside the functions that need them).
"""
