"""consa-vllm: learned full/sliding-window attention allocations, and a vLLM plugin to serve them.

Kept import-light on purpose: vLLM imports ``consa_vllm.plugin`` in every process.
"""

__version__ = "0.1.0"
