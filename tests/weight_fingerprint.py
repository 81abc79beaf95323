"""What weights an engine actually holds, without shipping tensors out of its worker.

:class:`FingerprintWorker` is a vLLM worker extension (engine argument
``worker_extension_cls="weight_fingerprint.FingerprintWorker"``): it adds one RPC method,
called by name through ``LLM.collective_rpc``, so no function is pickled into the worker.
Why: the intermittent wrong Mixtral engines (benchmarks/results/gpu_parity_h200/README.md,
runs 13-14) compute a wrong model from the start; comparing a wrong engine's fingerprints
with a right one's says whether its weights or its computation went wrong.

On GPUs every parameter and buffer is seen. On CPUs vLLM repacks each linear layer's weight
into a oneDNN handle and drops the parameter, so there only embeddings, norms, the LM head and
buffers are.
"""

from __future__ import annotations

EXTENSION = "weight_fingerprint.FingerprintWorker"


class FingerprintWorker:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's."""

    def consa_weight_fingerprints(self) -> dict[str, list[float]]:
        """Per parameter and buffer of the served model: [sum, sum of |x|, sum of x^2] in float64."""
        import torch

        model = self.model_runner.get_model()
        out: dict[str, list[float]] = {}
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                x = t.detach().to(torch.float64)
                out[name] = [float(x.sum()), float(x.abs().sum()), float((x * x).sum())]
        return out


def fingerprints(llm) -> dict[str, list[float]]:
    """The first worker's fingerprints (an ``inspect`` for ``engine_harness.run_vllm``)."""
    return llm.collective_rpc("consa_weight_fingerprints")[0]


def differing(a: dict[str, list[float]], b: dict[str, list[float]], rel: float = 1e-6) -> list[str]:
    """Names held by both engines whose fingerprints differ. Names held by one only are
    structure, not corruption (a ConSA engine's KV pools have scale buffers of their own)."""
    def same(x, y):
        return all(abs(p - q) <= rel * max(1.0, abs(p), abs(q)) for p, q in zip(x, y))
    return sorted(n for n in a.keys() & b.keys() if not same(a[n], b[n]))
