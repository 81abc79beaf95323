"""What did a wrong engine compute? Offline diagnosis of a GPU parity report.

A report of ``tests/gpu_parity.run_variants`` (written by ``tests/test_gpu_families.py`` and
``benchmarks/gpu_checks.sh``) keeps each engine's generated tokens and their logprobs. This
script rebuilds the GPU tests' tiny model of the family (``tests/gpu_parity.tiny_bf16_source``,
the same model ``test_gpu_families.py`` serves), or takes ``--model``. It then scores the engine's tokens by
teacher forcing in float32, under the model as it is and under a list of hypothesised wrong
computations:

- a layer's MLP / MoE block taken from another layer (shifted, or all from one layer);
- the router of another layer;
- the experts reversed;
- gate and up projections swapped;
- one layer's attention output dropped.

For each hypothesis it prints the mean |logprob_engine - logprob_hypothesis|. A healthy bf16
engine scores about 1e-2 on ``as_is``. A wrong engine that scores about 1e-2 on one
hypothesis has been identified.

Why this exists: the intermittent Mixtral defect, in which some compiled bf16 ConSA engines
serve a wrong model (benchmarks/results/gpu_parity_h200/README.md, run 13). CPU only::

    python benchmarks/diagnose_parity_report.py REPORT.json --family mixtral [--variant consa_all_f]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the GPU tests' harness: their model, prompts and scoring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; a missing or unreadable report is refused before any model is built."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a parity report JSON with engine outputs")
    ap.add_argument("--family", help="tiny model family to rebuild (tests' sizes); or give --model")
    ap.add_argument("--model", type=Path, help="the float32 source checkpoint the report's engines served")
    ap.add_argument("--variant", help="the report's variant to diagnose (default: every variant)")
    ap.add_argument("--prompt-seed", type=int, default=5,
                    help="seed of the prompts, for reports that do not store them (default 5, as the tests)")
    ap.add_argument("--out", type=Path, help="also write the scores as JSON here")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        ap.error(f"report {args.report}: no such file")
    try:
        report = json.loads(args.report.read_text())
    except ValueError as e:
        ap.error(f"report {args.report}: not JSON ({e})")
    if "outputs" not in report:
        ap.error(f"report {args.report}: no 'outputs' (engine tokens); reports from before session 10 lack them")
    if args.variant is not None and args.variant not in report["outputs"]:
        ap.error(f"--variant {args.variant}: not in the report (has {', '.join(report['outputs'])})")
    if (args.family is None) == (args.model is None):
        ap.error("give exactly one of --family and --model")
    if args.model is not None and not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there")
    if args.family is not None:
        from consa_vllm import families

        if args.family not in families.family_names():
            ap.error(f"--family {args.family}: not one of {', '.join(families.family_names())}")
    args.report_data = report
    return args


def hypotheses(model) -> dict[str, Callable[[dict], dict]]:
    """Name -> a function from the model's state dict to the tensors it replaces."""
    layers = model.model.layers
    n = len(layers)

    def mlp_keys(sd: dict, i: int) -> list[str]:
        return [k for k in sd if k.startswith(f"model.layers.{i}.mlp.")]

    def take_mlp(sd: dict, mapping: dict[int, int], only: str = "") -> dict:
        out = {}
        for i, j in mapping.items():
            for k in mlp_keys(sd, i):
                if only in k:
                    out[k] = sd[k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)].clone()
        return out

    hyp: dict[str, Callable[[dict], dict]] = {"as_is": lambda sd: {}}
    for s in range(1, n):
        hyp[f"mlp_shift{s}"] = lambda sd, s=s: take_mlp(sd, {i: (i + s) % n for i in range(n)})
    for j in range(n):
        hyp[f"mlp_all_from{j}"] = lambda sd, j=j: take_mlp(sd, {i: j for i in range(n) if i != j})
    sd0 = model.state_dict()
    if any(".mlp.gate.weight" in k for k in sd0):  # MoE
        hyp["router_shift1"] = lambda sd: take_mlp(sd, {i: (i + 1) % n for i in range(n)}, only=".gate.")
        hyp["experts_reversed"] = lambda sd: {k: v.flip(0).clone() for k, v in sd.items()
                                              if ".mlp.experts." in k}
    if any(k.endswith("experts.gate_up_proj") for k in sd0):
        hyp["gate_up_swapped"] = lambda sd: {k: v.roll(v.shape[1] // 2, dims=1).clone() for k, v in sd.items()
                                             if k.endswith("experts.gate_up_proj")}
    elif any(k.endswith("mlp.gate_proj.weight") for k in sd0):
        hyp["gate_up_swapped"] = lambda sd: {
            **{k: sd[k.replace("gate_proj", "up_proj")].clone() for k in sd if k.endswith("mlp.gate_proj.weight")},
            **{k: sd[k.replace("up_proj", "gate_proj")].clone() for k in sd if k.endswith("mlp.up_proj.weight")}}
    for j in range(n):
        hyp[f"attn_dropped{j}"] = lambda sd, j=j: {k: sd[k].new_zeros(sd[k].shape) for k in sd
                                                   if k.startswith(f"model.layers.{j}.self_attn.o_proj.")}
    return hyp


@contextmanager
def replaced(model, tensors: dict) -> Iterator[None]:
    """The model with ``tensors`` loaded in place of its own, restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if k in tensors}
    model.load_state_dict(tensors, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def diagnose(src: Path, report: dict, variant: str | None, prompt_seed: int) -> dict[str, dict[str, float]]:
    """Per variant, per hypothesis: mean |engine logprob - hypothesis logprob| over its tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine_harness import prompts_of
    from gpu_parity import teacher_forced_logprobs

    from consa_vllm.allocation import Allocation
    from consa_vllm.reference import patch_model

    prompts = report.get("prompts")
    if prompts is None:

        prompts = prompts_of(report["prompt_lengths"], seed=prompt_seed)
    results: dict[str, dict[str, float]] = {}
    for name, out in report["outputs"].items():
        if variant is not None and name != variant:
            continue
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        alloc = (report.get("variants", {}).get(name) or {}).get("allocation")
        if alloc is not None:
            patch_model(model, window=alloc["window"], allocation=Allocation(**alloc))
        engine = [x for row in out["logprobs"] for x in row]
        scores = {}
        for hname, make in hypotheses(model).items():
            with replaced(model, make(model.state_dict())):
                lps = [x for row in teacher_forced_logprobs(model, prompts, out["tokens"]) for x in row]
            scores[hname] = sum(abs(a - b) for a, b in zip(engine, lps)) / len(engine)
        results[name] = dict(sorted(scores.items(), key=lambda kv: kv[1]))
        best = next(iter(results[name].items()))
        print(f"{name}: as_is {results[name]['as_is']:.3e}; closest {best[0]} {best[1]:.3e}")
        for h, s in results[name].items():
            print(f"  {h:<18} {s:.3e}")
    return results


def first_token_split(report: dict) -> dict[str, tuple[float, float]]:
    """Per engine, the mean |dlogprob| at the first generated token and at the later ones.

    The first token comes from the prefill, which runs batches of thousands of tokens, above
    the largest CUDA graph: an engine as wrong there as later is wrong without CUDA graphs too
    (run 15). Engines without per-token errors in the report are left out."""
    out = {}
    for name, rows in report.get("per_token", {}).items():
        first = [r[0] for r in rows if r]
        later = [x for r in rows for x in r[1:]]
        if first and later:
            out[name] = (sum(first) / len(first), sum(later) / len(later))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gpu_parity import tiny_bf16_source

    # Reports since session 12 hold each engine's weight fingerprints: whether a wrong engine
    # holds other weights than its pair, before any hypothesis is scored.
    for pair, names in args.report_data.get("weight_differences", {}).items():
        print(f"weights {pair}: " + (f"{len(names)} parameters differ: {', '.join(names)}" if names else "identical"))
    for name, (first, later) in first_token_split(args.report_data).items():
        print(f"{name}: mean |dlogprob| {first:.3e} at the first token (prefill), {later:.3e} later")

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model if args.model is not None else tiny_bf16_source(Path(tmp) / "src", args.family)
        results = diagnose(src, args.report_data, args.variant, args.prompt_seed)
    if args.out is not None:
        args.out.write_text(json.dumps({"report": str(args.report), "scores": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
