"""How sensitive a model is to bfloat16 arithmetic, per allocation: the model run by Hugging
Face transformers with the reference attention in bfloat16 against the same model in float32.

Why this exists: the GPU calibrated-parity tests (tests/gpu_parity.py) compare a ConSA
model's bf16 error with stock vLLM's bf16 error on the all-F model. Those are two different
models. This script measures, with one plain implementation (HF + the reference attention,
no vLLM), how much of a difference in bf16 error comes from the model itself: if the uneven
model's bf16 error exceeds the all-F model's by the same factor here, the factor is a
property of the model, not of the serving kernels.

Same setup as tests/test_gpu_families.py: the tiny model of each family (head_dim 64, weights
rounded to bf16 values), window 32, the same allocations and prompt lengths; the error of a
token is |logprob_bf16 - logprob_fp32| of the float32 model's greedy tokens (teacher forcing).
Runs on a CPU (a numerical property, not a speed figure)::

    python benchmarks/bf16_sensitivity.py --out benchmarks/results/bf16_sensitivity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ALLOCATIONS = {  # name: (pattern, sink); the allocations of tests/test_gpu_families.py
    "all_f": (["FFFF"] * 4, 0),
    "uneven": (["FSSS", "SSSS", "SFFS", "FFFF"], 0),
    "uneven_sink4": (["FSSS", "SSSS", "SFFS", "FFFF"], 4),
    "uneven_sink16": (["FSSS", "SSSS", "SFFS", "FFFF"], 16),
    "layer_shaped": (["SSSS", "FFFF", "SSSS", "FFFF"], 0),
}


def per_prompt_errors(src: Path, pattern: list[str], sink: int, prompts: list[list[int]], new: int) -> list[float]:
    """Mean |dlogprob| (bf16 vs float32) of each prompt's ``new`` greedy tokens of the float32 model."""
    from engine_harness import reference_generate
    from gpu_parity import hf_bf16_errors

    from consa_vllm.allocation import Allocation

    alloc = Allocation(granularity="kv_head", window=32, pattern=pattern, sink=sink)
    gen = reference_generate(src, alloc, prompts, new)
    return [sum(row) / len(row) for row in hf_bf16_errors(src, alloc, gen, prompts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="qwen3,qwen3_moe,mixtral", help="comma list of registry families")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per allocation (lengths as in the GPU test)")
    ap.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from engine_harness import prompts_of
    from gpu_parity import tiny_bf16_source

    from consa_vllm.eval.stats import paired_bootstrap

    lengths = ([40, 77, 130, 300, 9, 520, 64, 700] * 8)[:args.prompts]
    prompts = prompts_of(lengths, seed=5)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "prompts": len(prompts), "new_tokens": args.new, "families": {}}
    for family in args.families.split(","):
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            src = tiny_bf16_source(Path(tmp) / "src", family)
            errs = {name: per_prompt_errors(src, pat, sink, prompts, args.new)
                    for name, (pat, sink) in ALLOCATIONS.items()}
        base = errs["all_f"]
        fam = {}
        for name, e in errs.items():
            d = paired_bootstrap(e, base)
            fam[name] = {"mean": sum(e) / len(e), "ratio_vs_all_f": sum(e) / sum(base),
                         "diff_vs_all_f": {"mean": d.mean, "low": d.low, "high": d.high, "p_value": d.p_value}}
            print(f"{family} {name}: mean {fam[name]['mean']:.4e}, x{fam[name]['ratio_vs_all_f']:.3f} of all-F "
                  f"(p {d.p_value:.4f})", flush=True)
        result["families"][family] = {"allocations": fam, "seconds": round(time.time() - start, 1)}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
