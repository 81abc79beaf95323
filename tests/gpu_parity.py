"""Calibrated GPU parity: a ConSA model's error against the reference attention, next to
stock vLLM's own error on the all-F model under the same dtype and quantization.

Both errors are measured the same way: vLLM generates greedily (a batch above 16, so that
the FlashAttention pool path runs for decode, with torch.compile and CUDA graphs), then
the float32 reference attention (HF transformers, patched with the allocation) scores
vLLM's own sequences by teacher forcing. The error of a generated token is
|logprob_vLLM - logprob_reference| of that token, so a bf16 divergence of greedy paths
does not inflate it. The ConSA model passes when its mean and max error are no larger
than stock vLLM's on the all-F model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from engine_harness import Generation, run_vllm


@dataclass
class ErrorStats:
    mean: float
    max: float
    tokens: int

    def __str__(self) -> str:
        return f"mean |dlogprob| {self.mean:.3e}, max {self.max:.3e} over {self.tokens} tokens"


def round_weights_to(src: Path, dtype: str) -> None:
    """Round a float32 checkpoint's weights to ``dtype`` values (kept as float32 on disk),
    so that vLLM in ``dtype`` and the float32 reference use exactly the same weights."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in src.glob("*.safetensors"):
        tensors = {k: v.to(getattr(torch, dtype)).to(torch.float32) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})


def reference_errors(src: Path, allocation, gen: Generation, prompts: list[list[int]]) -> ErrorStats:
    """Score vLLM's generated tokens with the float32 reference (teacher forcing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.reference import patch_model

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if allocation is not None:
        patch_model(model, window=allocation.window, allocation=allocation)
    errs: list[float] = []
    with torch.no_grad():
        for p, toks, lps in zip(prompts, gen.tokens, gen.top_logprobs):
            ids = torch.tensor([p + toks])
            logits = model(ids).logits[0, len(p) - 1:-1].float()
            ref = torch.log_softmax(logits, dim=-1)
            for i, t in enumerate(toks):
                errs.append(abs(lps[i][t] - float(ref[i, t])))
    return ErrorStats(mean=sum(errs) / len(errs), max=max(errs), tokens=len(errs))


def calibrated_parity(src: Path, consa_dir: Path, allocation, prompts: list[list[int]], max_tokens: int,
                      report: Path | None = None, stock_dir: Path | None = None, **engine_kw
                      ) -> tuple[ErrorStats, ErrorStats]:
    """(stock all-F error, ConSA error), both against the float32 reference.

    ``stock_dir`` is what stock vLLM serves (default ``src``: the same checkpoint, e.g. a
    quantized one); the reference always runs on ``src``'s (dequantized) weights.
    """
    kw = dict(enforce_eager=False, gpu_memory_utilization=0.06, max_num_seqs=64, max_model_len=2048)
    kw.update(engine_kw)
    stock_gen = run_vllm(stock_dir or src, prompts, max_tokens, **kw)
    consa_gen = run_vllm(consa_dir, prompts, max_tokens, **kw)
    stock = reference_errors(src, None, stock_gen, prompts)
    consa = reference_errors(src, allocation, consa_gen, prompts)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"stock_all_f": asdict(stock), "consa": asdict(consa),
                                      "engine": {k: str(v) for k, v in kw.items()},
                                      "pattern": allocation.pattern, "window": allocation.window}, indent=1))
    return stock, consa
