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

``--attn-scales 1,2,3`` measures the tiny models again with every layer's attention logits
multiplied by each factor (``tests/gpu_parity.scale_attention_logits``: the query-norm weights
where the family has them, else the query projection): how the comparison's outcome follows
the attention's sharpness, a property of the model that trained models and the tests' random
ones need not share (``benchmarks/results/bf16_sensitivity_attn_scale_cpu.json``).

``--model DIR --allocations A.json,B.json`` measures a trained local checkpoint instead, under
each allocation file against its all-F model, on prompts of real text
(``engine_harness.text_prompts``) longer than the window: whether the tiny random models'
sensitivity carries over to a trained model. tests/test_gpu_checkpoint.py runs the served
comparison on the same checkpoint, allocations and prompts on a GPU::

    python benchmarks/bf16_sensitivity.py --model runs/testbed-v2/pretrained \
        --allocations benchmarks/results/testbed_v2_h200_run7/allocations/consa-kv_head-global-0.75.json \
        --out benchmarks/results/bf16_sensitivity_testbed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
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


def per_prompt_errors(src: Path, alloc, prompts: list[list[int]], new: int) -> list[float]:
    """Mean |dlogprob| (bf16 vs float32) of each prompt's ``new`` greedy tokens of the float32 model."""
    from engine_harness import reference_generate
    from gpu_parity import hf_bf16_errors

    gen = reference_generate(src, alloc, prompts, new)
    return [sum(row) / len(row) for row in hf_bf16_errors(src, alloc, gen, prompts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="qwen3,qwen3_moe,mixtral", help="comma list of registry families")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per allocation (lengths as in the GPU test)")
    ap.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
    ap.add_argument("--attn-scales", default="1",
                    help="tiny models only: comma list of factors for every attention logit (default 1)")
    ap.add_argument("--model", help="a trained local HF checkpoint to measure instead of the tiny models")
    ap.add_argument("--allocations", help="with --model: comma list of allocation files, each against the all-F model")
    ap.add_argument("--lengths", help="with --model: prompt lengths in tokens (longer than the window), repeated "
                                      "to --prompts (default: the GPU checkpoint test's, 600-1500)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    if bool(args.model) != bool(args.allocations):
        ap.error("--model and --allocations go together")
    if args.prompts < 1 or args.new < 1:
        ap.error(f"--prompts and --new must be at least 1, got {args.prompts} and {args.new}")
    raw_scales = args.attn_scales
    try:
        args.attn_scales = [float(x) for x in raw_scales.split(",")]
    except ValueError:
        args.attn_scales = [0.0]
    if not all(0 < x < math.inf for x in args.attn_scales):
        ap.error(f"--attn-scales must be a comma list of positive numbers, got '{raw_scales}'")
    if args.model and args.attn_scales != [1.0]:
        ap.error("--attn-scales applies to the tiny models, not to --model")
    if args.lengths is not None:
        try:
            lengths = [int(n) for n in args.lengths.split(",")]
        except ValueError:
            lengths = [0]
        if min(lengths) < 1:
            ap.error(f"--lengths must be a comma list of whole numbers of tokens, got '{args.lengths}'")
        args.lengths = lengths

    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "tests"), str(root)]
    if args.model:
        try:
            checkpoint(args)
        except (ValueError, OSError) as e:  # AllocationError is a ValueError: one line, no traceback
            sys.exit(f"bf16_sensitivity.py: {e}")
        return
    import torch
    from engine_harness import prompts_of
    from gpu_parity import tiny_bf16_source

    from benchmarks.machine import cpu_name
    from consa_vllm.allocation import Allocation
    from consa_vllm.eval.stats import paired_bootstrap

    lengths = ([40, 77, 130, 300, 9, 520, 64, 700] * 8)[:args.prompts]
    prompts = prompts_of(lengths, seed=5)
    result = {"machine": cpu_name(), "torch": torch.__version__,
              "prompts": len(prompts), "new_tokens": args.new, "families": {}}
    runs = [(family, scale) for family in args.families.split(",") for scale in args.attn_scales]
    for family, scale in runs:
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            src = tiny_bf16_source(Path(tmp) / "src", family, attn_scale=scale)
            errs = {name: per_prompt_errors(src, Allocation(granularity="kv_head", window=32, pattern=pat, sink=sink),
                                            prompts, args.new)
                    for name, (pat, sink) in ALLOCATIONS.items()}
        entry = family if scale == 1 else f"{family} x{scale:g}"  # the family at that attention scale
        base = errs["all_f"]
        fam = {}
        for name, e in errs.items():
            d = paired_bootstrap(e, base)
            fam[name] = {"mean": sum(e) / len(e), "ratio_vs_all_f": sum(e) / sum(base),
                         "diff_vs_all_f": {"mean": d.mean, "low": d.low, "high": d.high, "p_value": d.p_value}}
            print(f"{entry} {name}: mean {fam[name]['mean']:.4e}, x{fam[name]['ratio_vs_all_f']:.3f} of all-F "
                  f"(p {d.p_value:.4f})", flush=True)
        result["families"][entry] = {"attn_scale": scale, "allocations": fam, "seconds": round(time.time() - start, 1)}
        Path(args.out).write_text(json.dumps(result, indent=1))


def checkpoint(args: argparse.Namespace) -> None:
    """``--model``: each allocation file against the checkpoint's all-F model."""
    import torch
    from engine_harness import text_prompts
    from gpu_parity import CHECKPOINT_LENGTHS, load_allocation_files

    from benchmarks.machine import cpu_name, git_commit, weights_sha256
    from consa_vllm.allocation import Allocation
    from consa_vllm.allocation.shape import ModelShape
    from consa_vllm.eval.stats import paired_bootstrap

    src = Path(args.model)
    allocs = load_allocation_files(src, args.allocations.split(","))  # a bad file stops here, before any model runs
    lengths = ((args.lengths or CHECKPOINT_LENGTHS) * args.prompts)[:args.prompts]
    prompts, used = text_prompts(src, lengths)
    shape = ModelShape.from_model_dir(src)
    all_f = Allocation(granularity="kv_head", window=allocs[0][1].window,
                       pattern=["F" * shape.num_kv_heads] * shape.num_layers)
    result = {"machine": cpu_name(), "torch": torch.__version__,
              "model": str(src), "weights_sha256": weights_sha256(src), "commit": git_commit(), "prompts": len(prompts),
              "prompt_sources": used, "new_tokens": args.new, "allocations": {}}
    start = time.time()
    base = per_prompt_errors(src, all_f, prompts, args.new)
    result["all_f"] = {"mean": sum(base) / len(base), "seconds": round(time.time() - start, 1)}
    print(f"all-F: mean {result['all_f']['mean']:.4e}", flush=True)
    for f, alloc in allocs:
        name = f.stem
        start = time.time()
        e = per_prompt_errors(src, alloc, prompts, args.new)
        d = paired_bootstrap(e, base)
        result["allocations"][name] = {
            "file": str(f), "window": alloc.window, "sink": alloc.sink,
            "s_share": alloc.sparsity, "mean": sum(e) / len(e), "ratio_vs_all_f": sum(e) / sum(base),
            "diff_vs_all_f": {"mean": d.mean, "low": d.low, "high": d.high, "p_value": d.p_value},
            "seconds": round(time.time() - start, 1)}
        print(f"{name}: mean {sum(e) / len(e):.4e}, x{sum(e) / sum(base):.3f} of all-F (p {d.p_value:.4f})", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
