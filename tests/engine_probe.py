"""What an engine holds and what it ran, read from inside its worker.

:class:`ProbeWorker` is a vLLM worker extension (engine argument
``worker_extension_cls="engine_probe.ProbeWorker"``): it adds RPC methods, called by name
through ``LLM.collective_rpc``, so no function is pickled into the worker.

- **Weight fingerprints.** The intermittent wrong Mixtral engines
  (benchmarks/results/gpu_parity_h200/README.md, runs 13-14) computed a wrong model from the
  start; comparing a wrong engine's fingerprints with a right one's says whether its weights or
  its computation went wrong. On GPUs every parameter and buffer is seen. On CPUs vLLM repacks
  each linear layer's weight into a oneDNN handle and drops the parameter, so there only
  embeddings, norms, the LM head and buffers are.
- **The schedule.** Which prompts each model step computed, and how many tokens of each. Two
  engines compared token by token must have run the same batches: a batch's composition
  changes the kernels' rounding (split counts, GEMM shapes, which attention path runs), so
  on a GPU two runs of one engine differ where their schedules do.
"""

from __future__ import annotations

EXTENSION = "engine_probe.ProbeWorker"


class ProbeWorker:
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

    def consa_schedule_start(self) -> None:
        """Start (or restart) recording the schedule of every following model step."""
        self._consa_schedule: list[list[list[int]]] = []
        runner = self.model_runner
        if getattr(runner, "_consa_schedule_wrapped", False):
            return
        execute_model, worker = runner.execute_model, self

        def recording(scheduler_output, *args, **kwargs):
            if scheduler_output.num_scheduled_tokens:
                # vLLM makes internal ids "<LLM's counter>-<random suffix>": the counter is the
                # prompt's index in the order the engine received them.
                worker._consa_schedule.append(sorted(
                    [int(rid.split("-", 1)[0]), n] for rid, n in scheduler_output.num_scheduled_tokens.items()))
            return execute_model(scheduler_output, *args, **kwargs)

        runner.execute_model = recording
        runner._consa_schedule_wrapped = True

    def consa_schedule(self) -> list[list[list[int]]]:
        """Per model step since :meth:`consa_schedule_start`: ``[prompt index, tokens]`` pairs."""
        return self._consa_schedule


def fingerprints(llm) -> dict[str, list[float]]:
    """The first worker's fingerprints (an ``inspect`` for ``engine_harness.run_vllm``)."""
    return llm.collective_rpc("consa_weight_fingerprints")[0]


def differing(a: dict[str, list[float]], b: dict[str, list[float]], rel: float = 1e-6) -> list[str]:
    """Names held by both engines whose fingerprints differ. Names held by one only are
    structure, not corruption (a ConSA engine's KV pools have scale buffers of their own)."""
    def same(x, y):
        return all(abs(p - q) <= rel * max(1.0, abs(p), abs(q)) for p, q in zip(x, y))
    return sorted(n for n in a.keys() & b.keys() if not same(a[n], b[n]))
