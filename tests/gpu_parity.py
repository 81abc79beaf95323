"""Calibrated GPU parity: a ConSA model's error against the reference attention, next to
stock vLLM's own error on the all-F model under the same dtype and quantization.

Every error is measured the same way: vLLM generates greedily (with torch.compile and CUDA
graphs; the prompts run in rounds, one with a decode batch above the fused kernel's limit
(128 // KV heads sequences) so that the FlashAttention pool path runs, one within it for the
small-decode path: over bf16 pools F heads on FlashAttention 3 beside S heads on the fused
Triton split-KV decode, over FP8 pools the fused decode alone; ``CONSA_SMALL_DECODE``), then the
float32 reference attention (HF transformers, patched with the allocation) scores vLLM's
own sequences by teacher forcing (for bf16 engines also Hugging Face itself in bf16: the
model's own bf16 sensitivity, reported beside as ``plain_hf_bf16`` and, per pair, the ratio
of the two errors each over its model's plain-bf16 error). The error of a generated token is
|logprob_vLLM - logprob_reference| of that token, so a bf16 divergence of greedy paths
does not inflate it. The ConSA model passes when its mean and max error are no larger
than stock vLLM's on the all-F model. Pairs of variants are also compared prompt by
prompt (paired bootstrap of the per-prompt mean errors), which says whether a difference
is larger than the spread over prompts.

:func:`run_variants` also serves diagnostic variants, each against its own reference:
the all-F allocation through the ConSA kernels (same model as stock all-F: isolates the
kernel path), the uneven allocation with FlashAttention off (the fused Triton kernel for
everything), and a layer-shaped allocation served both through the ConSA kernels and
through stock vLLM's per-layer windows (same model, two implementations).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine_harness import Generation, run_vllm
from engine_probe import EXTENSION, differing, fingerprints

if TYPE_CHECKING:
    from consa_vllm.allocation import Allocation


@dataclass
class ErrorStats:
    mean: float
    max: float
    p99: float
    tokens: int
    rounds: list[dict] = field(default_factory=list)  # mean / max per generation round

    def __str__(self) -> str:
        return (f"mean |dlogprob| {self.mean:.3e}, p99 {self.p99:.3e}, max {self.max:.3e} over {self.tokens} "
                f"tokens")


@dataclass
class Variant:
    """One engine: ``model`` served by vLLM, scored against the reference patched with
    ``allocation`` (None: plain HF attention), under the environment ``env``, with
    ``engine`` overriding the run's engine arguments (e.g. ``enforce_eager``)."""

    name: str
    model: Path
    allocation: object = None
    env: dict[str, str] = field(default_factory=dict)
    engine: dict = field(default_factory=dict)


def cache_env(root: Path | None) -> dict[str, str]:
    """Environment giving an engine's processes caches of their own under ``root``."""
    if root is None:
        return {}
    return {"VLLM_CACHE_ROOT": str(root / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "TRITON_CACHE_DIR": str(root / "triton")}


def pack_caches(root: Path, dst: Path) -> None:
    """The readable part of an engine's caches (generated code, autotuning choices, kernel
    metadata; not the compiled binaries) as one archive beside the report."""
    import tarfile

    if not root.is_dir():
        return
    with tarfile.open(dst, "w:gz") as tar:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in (".py", ".best_config", ".json"):
                tar.add(f, arcname=str(f.relative_to(root)))


def round_weights_to(src: Path, dtype: str) -> None:
    """Round a float32 checkpoint's weights to ``dtype`` values (kept as float32 on disk),
    so that vLLM in ``dtype`` and the float32 reference use exactly the same weights."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in src.glob("*.safetensors"):
        tensors = {k: v.to(getattr(torch, dtype)).to(torch.float32) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})


#: Every attention logit of the sharp-attention models is multiplied by this. The random
#: initialisation's attention is nearly uniform, and on those models plain Hugging Face bf16
#: itself, no vLLM, errs 1.15-1.44x more on the uneven model than on the all-F one: the rule
#: there fails whatever the serving kernels do. 3 is the smallest of the factors measured
#: (1, 2, 3) at which plain bf16 meets the rule on every family (0.83-0.89x,
#: benchmarks/results/bf16_sensitivity_attn_scale_cpu.json), so that on these models the rule
#: tests what the serving adds.
SHARP = 3.0


def scale_attention_logits(src: Path, factor: float) -> None:
    """Multiply every attention logit of the checkpoint in ``src`` by ``factor``, in place: the
    query-norm weights where the family normalises queries (a scaled query projection would be
    normalised away there), else the query projection and its bias. Each tensor keeps its
    dtype (round float32 weights to bf16 values after, :func:`round_weights_to`, where that
    matters)."""
    from safetensors.torch import load_file, save_file

    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        has_q_norm = any(k.endswith("self_attn.q_norm.weight") for k in tensors)
        names = ("self_attn.q_norm.weight",) if has_q_norm else ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
        if not any(k.endswith(names) for k in tensors):
            raise ValueError(f"{f}: no attention query weights ({', '.join(names)}) to scale")
        save_file({k: ((v.float() * factor).to(v.dtype) if k.endswith(names) else v) for k, v in tensors.items()},
                  f, metadata={"format": "pt"})


def tiny_bf16_source(out_dir: Path, family: str, attn_scale: float = 1.0) -> Path:
    """The GPU tests' tiny model of ``family`` (the tests' sizes, head_dim 64) in ``out_dir``,
    its weights rounded to bf16 values (:func:`round_weights_to`); the GPU tests, the bf16
    sensitivity benchmark and the parity-report diagnosis all score this model. ``attn_scale``
    multiplies every attention logit (:func:`scale_attention_logits`): the random
    initialisation's attention is nearly uniform, which no trained model's is."""
    from engine_harness import TINY

    from consa_vllm.tiny import build_tiny_model

    src = build_tiny_model(out_dir, family, **{**TINY, "head_dim": 64})
    round_weights_to(src, "bfloat16")
    if attn_scale != 1:
        # Scaled after the first rounding, then rounded again: the weights the committed
        # measurements at these factors used (bf16_sensitivity_attn_scale_cpu.json, run 27).
        scale_attention_logits(src, attn_scale)
        round_weights_to(src, "bfloat16")
    return src


#: Which draw of prompts the calibrated tests serve (``CONSA_GPU_PROMPT_SEED``, default 0: the
#: prompts of every committed run before the draws). gpu_checks.sh's PROMPT_SEEDS runs a case once
#: per draw, stock and ConSA on the same prompts each time, so that a max or mean above stock's
#: can be judged across draws (benchmarks/parity_tail.py's ``across_runs``, docs/DESIGN.md §10).
PROMPT_SEED = os.environ.get("CONSA_GPU_PROMPT_SEED", "0")
if not PROMPT_SEED.isdigit():
    raise ValueError(f"CONSA_GPU_PROMPT_SEED must be a whole number, got {PROMPT_SEED!r}")


def prompt_draw(base: int) -> int:
    """The seed of a test's random prompts (``engine_harness.prompts_of``) under this process's
    draw: ``base``, the test's own seed, for draw 0; other draws far from every test's base."""
    return base + 1000 * int(PROMPT_SEED)


#: Where the Hugging Face references (float32, and the plain bf16 pass) run: "cpu", or "cuda" on
#: the GPU machine, where 32 prompts of up to 1,500 tokens take seconds instead of minutes per
#: engine (TF32 off: float32 stays float32). Set by ``CONSA_GPU_REFERENCE_DEVICE``.
REFERENCE_DEVICE = os.environ.get("CONSA_GPU_REFERENCE_DEVICE", "cpu")
if REFERENCE_DEVICE != "cpu" and not re.fullmatch(r"cuda(:\d+)?", REFERENCE_DEVICE):
    raise ValueError(f"CONSA_GPU_REFERENCE_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got {REFERENCE_DEVICE!r}")


def teacher_forced_logprobs(model, prompts: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """Per prompt, the logprob under the HF ``model`` of each of its generated ``tokens``."""
    import torch

    out: list[list[float]] = []
    with torch.no_grad():
        for p, toks in zip(prompts, tokens):
            ids = torch.tensor([p + toks], device=model.device)
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), dim=-1)
            out.append(lp[torch.arange(len(toks), device=lp.device), torch.tensor(toks, device=lp.device)].tolist())
    return out


def hf_token_logprobs(src: Path, allocation, gen: Generation, prompts: list[list[int]],
                      dtype: str = "float32") -> list[list[float]]:
    """Per prompt, the logprob of each of ``gen``'s tokens under Hugging Face in ``dtype`` with
    the reference attention patched in (teacher forcing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.reference import patch_model

    if REFERENCE_DEVICE.startswith("cuda"):
        # vLLM may have lowered this process's float32 matmul precision (TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).to(REFERENCE_DEVICE).eval()
    if allocation is not None:
        patch_model(model, window=allocation.window, allocation=allocation)
    try:
        return teacher_forced_logprobs(model, prompts, gen.tokens)
    finally:
        del model
        if REFERENCE_DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()  # the next engine's memory check sees this process's cache


def token_errors(src: Path, allocation, gen: Generation, prompts: list[list[int]],
                 reference: list[list[float]] | None = None) -> list[list[float]]:
    """Per prompt, the |dlogprob| of each generated token against the float32 reference
    (teacher forcing on vLLM's own tokens); ``reference``: those logprobs, if already scored."""
    ref = reference or hf_token_logprobs(src, allocation, gen, prompts)
    return [[abs(lps[i][t] - r[i]) for i, t in enumerate(toks)]
            for toks, lps, r in zip(gen.tokens, gen.top_logprobs, ref)]


def hf_bf16_errors(src: Path, allocation, gen: Generation, prompts: list[list[int]],
                   reference: list[list[float]] | None = None) -> list[list[float]]:
    """The model's own sensitivity to bf16: per prompt, |logprob_bf16 - logprob_fp32| of
    ``gen``'s tokens, both from Hugging Face with the reference attention (no vLLM involved;
    benchmarks/bf16_sensitivity.py); ``reference``: the float32 logprobs, if already scored."""
    ref = reference or hf_token_logprobs(src, allocation, gen, prompts)
    bf16 = hf_token_logprobs(src, allocation, gen, prompts, "bfloat16")
    return [[abs(x - y) for x, y in zip(r, b)] for r, b in zip(ref, bf16)]


def reference_errors(src: Path, allocation, gen: Generation, prompts: list[list[int]]) -> "ErrorStats":
    """:func:`token_errors` summarised (mean, p99, max)."""
    return error_stats(token_errors(src, allocation, gen, prompts))


def error_stats(errs: list[list[float]], rounds: list[int] | None = None) -> ErrorStats:
    """Mean, 99th percentile and max over all tokens, and mean / max per round of prompts."""
    flat = sorted(e for row in errs for e in row)
    stats = ErrorStats(mean=sum(flat) / len(flat), max=flat[-1], p99=flat[min(len(flat) - 1, int(0.99 * len(flat)))],
                       tokens=len(flat))
    start = 0
    for n in rounds or [len(errs)]:
        part = [e for row in errs[start:start + n] for e in row]
        stats.rounds.append({"prompts": n, "mean": sum(part) / len(part), "max": max(part)})
        start += n
    return stats


@contextmanager
def _env(values: dict[str, str]):
    # Engines run in spawned processes, which inherit os.environ at start.
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def paired(errs_a: list[list[float]], errs_b: list[list[float]]) -> dict:
    """Per-prompt errors of ``a`` against ``b`` (same prompts): the ratio of the overall means
    and the paired bootstrap of ``mean(a) - mean(b)`` (95% interval, p-value); and under
    ``max``, the ratio of the largest token errors and the paired bootstrap of their difference
    (one extreme token each: whether a larger max is more than which prompts were drawn)."""
    from consa_vllm.eval.stats import paired_bootstrap, paired_bootstrap_max

    a = [sum(r) / len(r) for r in errs_a]
    b = [sum(r) / len(r) for r in errs_b]
    d = paired_bootstrap(a, b)
    m = paired_bootstrap_max([max(r) for r in errs_a], [max(r) for r in errs_b])
    return {"ratio": sum(a) / sum(b), "diff": d.mean, "low": d.low, "high": d.high, "p_value": d.p_value,
            "max": {"ratio": max(map(max, errs_a)) / max(map(max, errs_b)), "diff": m.mean, "low": m.low,
                    "high": m.high, "p_value": m.p_value}}


def run_variants(src: Path, variants: list[Variant], prompts: list[list[int]], max_tokens: int,
                 rounds: list[int] | None = None, report: Path | None = None,
                 pairs: list[tuple[str, str]] = (), **engine_kw) -> dict[str, ErrorStats]:
    """Serve each variant in turn and score it; write everything (per-token errors and the
    paired comparisons of ``pairs`` too) to ``report``. The reference always runs on
    ``src``'s weights."""
    kw = dict(enforce_eager=False, gpu_memory_utilization=0.06, max_num_seqs=64, max_model_len=2048,
              worker_extension_cls=EXTENSION)
    kw.update(engine_kw)
    results: dict[str, ErrorStats] = {}
    per_token: dict[str, list[list[float]]] = {}
    # Each engine's own tokens and their logprobs, so that a wrong engine (the intermittent
    # Mixtral defect) can be compared offline against hypotheses of what it computed.
    outputs: dict[str, dict] = {}
    hf: dict[str, ErrorStats] = {}  # each model's own bf16 sensitivity (bf16 engines only)
    for v in variants:
        with _env(v.env):
            gen = run_vllm(v.model, prompts, max_tokens, rounds=rounds, inspect=fingerprints, record_schedule=True,
                           **{**kw, **v.engine})
        ref = hf_token_logprobs(src, v.allocation, gen, prompts)
        per_token[v.name] = token_errors(src, v.allocation, gen, prompts, ref)
        results[v.name] = error_stats(per_token[v.name], rounds)
        outputs[v.name] = {"tokens": gen.tokens, "weight_fingerprints": gen.extra, "schedule": gen.schedule,
                           "logprobs": [[round(lps[i][t], 6) for i, t in enumerate(toks)]
                                        for toks, lps in zip(gen.tokens, gen.top_logprobs)],
                           "reference": [[round(x, 6) for x in row] for row in ref]}
        if kw.get("dtype") == "bfloat16":
            hf[v.name] = error_stats(hf_bf16_errors(src, v.allocation, gen, prompts, ref))
        print(f"  {v.name}: {results[v.name]}" + (f"; plain HF bf16: {hf[v.name]}" if v.name in hf else ""),
              flush=True)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps({
                "stats": {k: asdict(s) for k, s in results.items()},
                # Same batches in both engines (the rounds are queued whole): a paired comparison.
                "paired": {f"{a} vs {b}": {**paired(per_token[a], per_token[b]),
                                           "same_schedule": outputs[a]["schedule"] == outputs[b]["schedule"],
                                           **({"ratio_over_plain_bf16": (results[a].mean / hf[a].mean)
                                               / (results[b].mean / hf[b].mean)} if a in hf and b in hf else {})}
                           for a, b in pairs if a in per_token and b in per_token},
                "plain_hf_bf16": {k: asdict(x) for k, x in hf.items()},
                # Parameters whose fingerprints differ (same checkpoint and layout: expect none;
                # a head-permuted layout differs in its attention projections).
                "weight_differences": {f"{a} vs {b}": differing(outputs[a]["weight_fingerprints"],
                                                                outputs[b]["weight_fingerprints"])
                                       for a, b in pairs if a in outputs and b in outputs},
                "variants": {x.name: {"allocation": None if x.allocation is None else
                                      {"granularity": x.allocation.granularity, "pattern": x.allocation.pattern,
                                       "window": x.allocation.window, "sink": x.allocation.sink},
                                      "env": x.env, "engine": x.engine} for x in variants},
                "engine": {k: str(val) for k, val in kw.items()}, "rounds": rounds,
                "reference_device": REFERENCE_DEVICE,
                "prompt_lengths": [len(p) for p in prompts], "prompts": prompts,
                "per_token": {k: [[round(e, 6) for e in row] for row in rows] for k, rows in per_token.items()},
                "outputs": outputs,
            }, indent=1))
    check_engines_served_their_model(results, hf)
    return results


#: A bf16 engine whose mean error exceeds this many times its model's own plain-HF bf16 error
#: served a wrong model. Healthy engines measured on the H200 (runs 11-14): 0.8-1.5x
#: unquantized, 4x with an FP8 KV cache, 7.5x with FP8 checkpoints, 12x with online FP8
#: weights (whose reference is the unquantized model); wrong Mixtral engines: 44-52x.
WRONG_MODEL_FACTOR = 20.0


def check_engines_served_their_model(results: dict[str, ErrorStats], hf: dict[str, ErrorStats]) -> None:
    """Fail when any engine, stock vLLM's included, served a wrong model.

    A comparison against a stock engine that is itself wrong tells nothing (run 14: two
    compiled bf16 stock Mixtral engines served a wrong model and the ConSA engines beside
    them passed "no worse than stock"), so every engine of a run must first be sane. Called
    after the report is written: a wrong engine's tokens stay there for
    ``benchmarks/diagnose_parity_report.py``.
    """
    wrong = [f"{name} (mean |dlogprob| {s.mean:.3e}, {s.mean / hf[name].mean:.1f}x its plain HF bf16 error "
             f"{hf[name].mean:.3e})" for name, s in results.items()
             if name in hf and s.mean > WRONG_MODEL_FACTOR * hf[name].mean]
    assert not wrong, (f"engine(s) served a wrong model, more than {WRONG_MODEL_FACTOR:g}x the model's own "
                       f"bf16 error: {'; '.join(wrong)}")


def calibrated_parity(src: Path, consa_dir: Path, allocation, prompts: list[list[int]], max_tokens: int,
                      report: Path | None = None, stock_dir: Path | None = None,
                      rounds: list[int] | None = None, **engine_kw) -> tuple[ErrorStats, ErrorStats]:
    """(stock all-F error, ConSA error), both against the float32 reference.

    ``stock_dir`` is what stock vLLM serves (default ``src``: the same checkpoint, e.g. a
    quantized one); the reference always runs on ``src``'s (dequantized) weights.
    """
    res = run_variants(src, [Variant("stock_all_f", stock_dir or src), Variant("consa", consa_dir, allocation)],
                       prompts, max_tokens, rounds=rounds, report=report, pairs=[("consa", "stock_all_f")],
                       **engine_kw)
    return res["stock_all_f"], res["consa"]


#: Prompt lengths (tokens) of the checkpoint comparison, cycled to its prompts: all beyond the
#: testbed's window of 512 (also the default of benchmarks/bf16_sensitivity.py --model).
CHECKPOINT_LENGTHS = [600, 1500, 900, 1200, 700, 1400, 1000, 800]
#: Rounds of the checkpoint comparison: a decode batch of 24 (above the fused kernel's limit on
#: a GPU: FlashAttention 3 over the pools), then 4 and 4 (the small-decode path: the fused Triton
#: split-KV decode, for F heads FlashAttention 3 over bf16 pools; ``CONSA_SMALL_DECODE``).
CHECKPOINT_ROUNDS = [24, 4, 4]
#: The engines' length limit in the checkpoint comparison (the longest prompt and its new tokens fit).
CHECKPOINT_MAX_MODEL_LEN = 2048


def load_allocation_files(src: Path, files: list[Path]) -> list[tuple[Path, "Allocation"]]:
    """Each allocation file loaded and checked against ``src``'s shape, before any model runs; a
    bad file raises (ValueError) with its name. Results are keyed by file name, so two files of
    one name are refused: one of them would go unmeasured."""
    from consa_vllm.allocation import Allocation
    from consa_vllm.allocation.shape import ModelShape

    files = [Path(f) for f in files]
    if len({f.stem for f in files}) < len(files):
        raise ValueError(f"{','.join(map(str, files))}: two files have the same name")
    shape = ModelShape.from_model_dir(src)
    pairs = [(f, Allocation.load(f)) for f in files]
    for f, a in pairs:
        a.check_model(shape.num_layers, shape.num_kv_heads, source=f)
    return pairs


#: What the plugin sets for a ConSA MoE model whose expert count Inductor would pad
#: (consa_vllm.plugin.config.guard_router_padding), given to stock vLLM's engine by hand: stock
#: vLLM 0.26 routes tokens with misread logits when Inductor pads them (test_gpu_router_padding),
#: and a comparison against a wrong stock engine tells nothing.
NO_SHAPE_PADDING = {"compilation_config": {"inductor_compile_config": {"shape_padding": False}}}


def stock_router_guard(ckpt: Path, dtype: str = "bfloat16") -> dict:
    """Engine settings that give stock vLLM, serving ``ckpt`` in ``dtype``, the router-padding
    guard the plugin gives its ConSA export (:data:`NO_SHAPE_PADDING` for an MoE checkpoint whose
    expert count is not a multiple of Inductor's alignment), so that the two compile alike."""
    from transformers import AutoConfig

    from consa_vllm import families
    from consa_vllm.plugin.config import router_padding_alignment

    # Through transformers, as vLLM reads it: a field may be stored under another name
    # (transformers 5 writes Qwen3-MoE's num_experts as num_local_experts).
    cfg = AutoConfig.from_pretrained(ckpt)
    fam = families.by_model_type(cfg.model_type, where=str(ckpt / "config.json"))
    experts = getattr(cfg, fam.experts_field, None) if fam.is_moe else None
    return dict(NO_SHAPE_PADDING) if router_padding_alignment(experts, dtype) else {}


def reference_weights(ckpt: Path, work_dir: Path) -> Path:
    """The float weights the reference attention runs on for a served checkpoint: ``ckpt``
    itself, or for a quantized one (a ``quantization_config`` in its config) its copy
    dequantized by the format's own reference code (``quant_harness.dequantized_copy``), so
    that stock vLLM and the plugin are both scored against the weights they serve."""
    if "quantization_config" not in json.loads((ckpt / "config.json").read_text()):
        return ckpt
    from quant_harness import dequantized_copy

    return dequantized_copy(ckpt, work_dir / "dequantized")


def checkpoint_parity(src: Path, allocations: list[tuple[Path, "Allocation"]], work_dir: Path, report: Path,
                      new_tokens: int = 32, lengths: list[int] = CHECKPOINT_LENGTHS,
                      rounds: list[int] = CHECKPOINT_ROUNDS, seed: int = 0, served: Path | None = None,
                      **engine_kw) -> dict:
    """The calibrated rule on a trained checkpoint: stock vLLM on the all-F ``served`` (default
    ``src``; a quantized checkpoint, with ``src`` its :func:`reference_weights`) and the plugin on
    ``served`` exported under each of ``allocations`` (:func:`load_allocation_files`, named by
    file), in bf16 (``engine_kw`` adds e.g. ``kv_cache_dtype="fp8"`` or online
    ``quantization="fp8"`` to every engine), on prompts of real text
    (``engine_harness.text_prompts``, ``lengths`` cycled to ``sum(rounds)`` prompts, cut at
    ``seed``'s offsets) longer than the window, generated in ``rounds``, all scored against the
    float32 reference on ``src``. Runs on whatever device vLLM finds
    (tests/test_gpu_checkpoint.py on a GPU, benchmarks/checkpoint_parity.py anywhere).

    Returns ``{"stock_all_f": ErrorStats, "allocations": {name: ErrorStats}, "above_stock":
    [names whose mean or max error exceeds stock's], "paired": {name: paired comparison with
    stock (:func:`paired`)}}``; ``report`` holds every token.
    """
    from engine_harness import text_prompts

    from consa_vllm.export import export_model

    allocs = {f.stem: a for f, a in allocations}
    n = sum(rounds)
    prompts, _ = text_prompts(src, (lengths * n)[:n], seed=seed)
    served = served or src
    variants = [Variant("stock_all_f", served, engine=stock_router_guard(served))] + [Variant(name, export_model(served, a, work_dir / name), a)
                                                   for name, a in allocs.items()]
    res = run_variants(src, variants, prompts, new_tokens, rounds=rounds, report=report,
                       pairs=[(name, "stock_all_f") for name in allocs],
                       **{"dtype": "bfloat16", "max_model_len": CHECKPOINT_MAX_MODEL_LEN, **engine_kw})
    stock = res["stock_all_f"]
    # run_variants wrote the paired comparisons into the report; read them rather than redo them.
    compared = json.loads(report.read_text())["paired"]
    return {"stock_all_f": stock, "allocations": {name: res[name] for name in allocs},
            "above_stock": [name for name in allocs if res[name].mean > stock.mean or res[name].max > stock.max],
            "paired": {name: compared[f"{name} vs stock_all_f"] for name in allocs}}
