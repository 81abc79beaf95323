"""The calibrated parity rule on a trained checkpoint, served by real vLLM engines on whatever
device this machine has: stock vLLM on the all-F checkpoint and the plugin under each
allocation file, both in bf16 with torch.compile, each scored against the float32 reference
attention (HF transformers) on the same prompts of real text. The rule: the ConSA model's mean
and max |dlogprob| no larger than stock vLLM's on the all-F model.

tests/test_gpu_checkpoint.py is the same comparison (``gpu_parity.checkpoint_parity``) as a GPU
test with CUDA graphs; this script runs it anywhere, CPU included, and writes the figures with
the machine, commit and weight hashes. On a CPU the plugin's attention is its torch paged path
(docs/DESIGN.md, "Kernels"), not the GPU kernels: a CPU run says whether the trained model's
uneven allocations are more bf16-sensitive when served, not how the GPU kernels round::

    python benchmarks/checkpoint_parity.py --model /tmp/tbmodel/pretrained \\
        --allocations benchmarks/results/testbed_v2_h200_run7/allocations/consa-kv_head-global-0.75.json \\
        --out benchmarks/results/checkpoint_parity_testbed_cpu.json

Issue 12's rule on a trained model: ``--kv-cache-dtype fp8`` (both engines on an FP8 cache),
``--quantization fp8`` (vLLM's online FP8 weights; the reference stays the bf16 model), or a
quantized checkpoint as ``--model`` (FP8, AWQ, GPTQ, compressed-tensors; the reference then runs
on its dequantized copy, ``gpu_parity.reference_weights``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained local HF checkpoint, stored in bf16")
    ap.add_argument("--allocations", required=True, help="comma list of allocation files for it")
    ap.add_argument("--new", type=int, default=32, help="generated tokens per prompt (default 32)")
    ap.add_argument("--lengths", help="prompt lengths in tokens, comma list, cycled to the prompts; longer than "
                                      "the window (default: the GPU test's, 600-1500)")
    ap.add_argument("--seed", type=int, default=0, help="where the prompts are cut from the sources (default 0, "
                                                          "the GPU test's)")
    ap.add_argument("--rounds", help="prompts per generation round, comma list (default: the GPU test's 24,4,4)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                    help="KV-cache dtype of every engine (default auto: the model's, bf16)")
    ap.add_argument("--quantization", choices=["fp8"],
                    help="vLLM's online weight quantization for every engine (--model unquantized)")
    ap.add_argument("--out", required=True, help="JSON file to write (the summary; per-token figures beside it)")
    args = ap.parse_args()
    if args.new < 1:
        ap.error(f"--new must be at least 1, got {args.new}")
    lengths, rounds = _counts(ap, "--lengths", args.lengths), _counts(ap, "--rounds", args.rounds)

    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "tests"), str(root)]
    from gpu_parity import CHECKPOINT_LENGTHS, CHECKPOINT_ROUNDS

    lengths, rounds = lengths or CHECKPOINT_LENGTHS, rounds or CHECKPOINT_ROUNDS
    src = Path(args.model)
    try:
        allocations = check_inputs(src, args.allocations, lengths, args.new)
        quant_method = check_engine_options(src, args.kv_cache_dtype, args.quantization)
    except (ValueError, OSError) as e:  # AllocationError is a ValueError: one line, no traceback
        sys.exit(f"checkpoint_parity.py: {e}")
    engine_kw = {**({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype != "auto" else {}),
                 **({"quantization": args.quantization} if args.quantization else {})}

    import torch
    from gpu_parity import checkpoint_parity, reference_weights

    from benchmarks.machine import git_commit, machine_name, weights_sha256

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = out.with_name(out.stem + "_tokens.json")
    device = machine_name()
    # The prompts are cut from this commit's sources (engine_harness.text_prompts): record it first.
    commit = git_commit()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_weights(src, Path(tmp))
        res = checkpoint_parity(ref, allocations, Path(tmp), report, new_tokens=args.new, lengths=lengths,
                                rounds=rounds, seed=args.seed, served=src, **engine_kw)
    stock = res["stock_all_f"]
    rows = {}
    for f, _ in allocations:
        s = res["allocations"][f.stem]
        rows[f.stem] = {**asdict(s), "file": str(f), "mean_vs_stock": s.mean / stock.mean,
                        "max_vs_stock": s.max / stock.max, "paired_vs_stock": res["paired"][f.stem],
                        "rule_met": f.stem not in res["above_stock"]}
    summary = {
        "machine": device, "torch": torch.__version__, "commit": commit,
        "model": str(src), "weights_sha256": weights_sha256(src),
        "dtype": "bfloat16", "kv_cache_dtype": args.kv_cache_dtype, "online_quantization": args.quantization,
        "checkpoint_quantization": quant_method,
        "reference": "the model's own weights" if quant_method is None else "its dequantized copy",
        "rounds": rounds, "prompt_seed": args.seed, "new_tokens": args.new,
        "seconds": round(time.time() - start, 1), "tokens_report": report.name,
        "stock_all_f": asdict(stock),
        "allocations": rows,
    }
    out.write_text(json.dumps(summary, indent=1))
    for name, a in summary["allocations"].items():
        c = a["paired_vs_stock"]
        print(f"{name}: of stock all-F, mean x{a['mean_vs_stock']:.3f} (paired p {c['p_value']:.3f}), "
              f"max x{a['max_vs_stock']:.3f} (paired p {c['max']['p_value']:.3f}); "
              f"rule {'met' if a['rule_met'] else 'NOT met'}")


def check_inputs(src: Path, allocations: str, lengths: list[int], new: int) -> list[tuple[Path, object]]:
    """The checkpoint and the allocation files, loaded and each checked against the model's shape
    (``gpu_parity.load_allocation_files``), and the prompt lengths against the windows and the
    engines' length limit, before any engine starts; a bad one raises with the file or flag named."""
    from gpu_parity import CHECKPOINT_MAX_MODEL_LEN, load_allocation_files

    if not (src / "config.json").is_file():
        raise ValueError(f"--model {src}: no config.json there (a local HF checkpoint directory is needed)")
    files = [Path(f) for f in allocations.split(",") if f]
    if not files:
        raise ValueError("--allocations: no file named")
    if max(lengths) + new > CHECKPOINT_MAX_MODEL_LEN:
        raise ValueError(f"--lengths/--new: a prompt of {max(lengths)} tokens and {new} new ones exceed the "
                         f"engines' max_model_len of {CHECKPOINT_MAX_MODEL_LEN}")
    pairs = load_allocation_files(src, files)
    for f, alloc in pairs:
        if min(lengths) <= alloc.sink + alloc.window:
            raise ValueError(f"--lengths: a prompt of {min(lengths)} tokens does not reach beyond {f}'s "
                             f"sink + window ({alloc.sink} + {alloc.window}), where S heads differ from F")
    return pairs


def _fp8_weights(qcfg: dict) -> bool:
    """Whether a ``quantization_config`` stores FP8 weights: vLLM's ``fp8`` method, or
    compressed-tensors whose every weight scheme is an 8-bit float (W4A16 and other integer
    schemes are not)."""
    from consa_vllm.plugin.permute import is_fp8_weight_scheme

    if qcfg.get("quant_method") == "fp8":
        return True
    groups = qcfg.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    return qcfg.get("quant_method") == "compressed-tensors" and bool(weights) and all(map(is_fp8_weight_scheme, weights))


def check_engine_options(src: Path, kv_cache_dtype: str, quantization: str | None) -> str | None:
    """The checkpoint's ``quant_method`` (None: unquantized), after refusing engine options this
    checkpoint or machine cannot run, before any engine starts."""
    import torch
    from engine_harness import VLLM_CPU_AVX512

    qcfg = json.loads((src / "config.json").read_text()).get("quantization_config")
    method = None if qcfg is None else qcfg.get("quant_method", "unknown")
    if quantization and method:
        raise ValueError(f"--quantization {quantization}: --model {src} is already quantized ({method}); "
                         "online quantization takes an unquantized checkpoint")
    if not torch.cuda.is_available() and not VLLM_CPU_AVX512:
        # vllm-cpu's AVX2 build (x86 without AVX-512 or AMX) has neither (engine_harness).
        if kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: vllm-cpu has FP8 KV caches only in its AVX-512 "
                             "build, and this CPU has no AVX-512 or AMX; run it on a GPU")
        what = f"--quantization {quantization}" if quantization else f"--model {src} ({method})"
        if quantization or (method is not None and not _fp8_weights(qcfg)):
            raise ValueError(f"{what}: vllm-cpu's build for CPUs without AVX-512 or AMX (this one) runs only FP8 "
                             "checkpoints; run it on a GPU")
    return method


def _counts(ap: argparse.ArgumentParser, flag: str, value: str | None) -> list[int] | None:
    """A comma list of whole numbers of at least 1 (None when not given); anything else is one argparse line."""
    if value is None:
        return None
    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        counts = [0]
    if min(counts) < 1:
        ap.error(f"{flag} must be a comma list of whole numbers of at least 1, got '{value}'")
    return counts


if __name__ == "__main__":
    main()
