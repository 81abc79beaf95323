"""Where a parity report's largest errors come from: the tail of each engine's token errors, raw
and divided by each token's sensitivity, and how far stock vLLM moves between two runs.

The calibrated rule compares the largest |dlogprob| of about a thousand tokens. A token's error
in bf16 is roughly the logit noise times the derivative of its log-probability, ``1 - p`` (``p``:
the float32 reference probability of the token): a token the model is unsure of moves more
under the same rounding. So a model that generates more uncertain tokens, or simply other ones,
can have a larger maximum with the same numerics. This script separates the two, offline, from
the reports ``tests/gpu_parity.run_variants`` writes (every token's error, the engine's tokens
and the reference logprobs):

- per engine: mean, p99 and max of the raw error; tokens above 0.04 and 0.05 per 1,024; the same
  where each kernel path ran (the first generated token, from the prefill; decode steps; each
  round's decode steps);
- the same statistics of ``error / (1 - p)`` over the tokens with ``1 - p >= --min-sensitivity``
  (the logit-noise scale: equal numerics give equal distributions whatever tokens were drawn);
- with several reports of the same model, prompts and engine options, stock vLLM's run-to-run
  difference: the share of token logprobs that differ between two runs of the stock engine (same
  tokens only) and by how much (GPU engines are not batch-invariant: a batch's composition follows
  the scheduler's timing);
- over several reports of the same stock engine on the same model (repeated runs, on the same
  prompts or, with gpu_checks.sh's PROMPT_SEEDS, on other prompts each): each engine's maxima and
  means run by run; an exact permutation test of whether an allocation's runs have a larger mean
  maximum (and mean) than stock's runs, and a paired one (signs of the per-run differences
  flipped: each run's ConSA and stock engines served the same prompts in the same batches): the
  rule's max judged against stock's own spread; every run's prompts pooled into one paired
  bootstrap of the mean; and the same ratios for plain Hugging Face in bf16 on each engine's
  tokens (the model's own sensitivity, no vLLM), which the served ratio is divided by;
- with ``--model`` (the float32 checkpoint an MoE report served): at each generated token the
  router's smallest margin, over the MoE layers, between the last expert chosen and the first one
  not chosen (router logits, float32, under the variant's allocation), and where the largest errors
  fall among them. An expert choice that bf16 rounding can flip gives a large error on that token
  whatever the attention kernels do.

    python benchmarks/parity_tail.py A.json [B.json ...] [--stock stock_all_f] [--model DIR] [--out tail.json]

CPU only: seconds, or a minute per variant with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import combinations
from pathlib import Path


TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the GPU tests' harness, whose statistics the reports hold


def _stats(values: list[float]) -> dict:
    """Mean, 99th percentile and max of ``values``, as the reports compute them
    (``gpu_parity.error_stats``)."""
    if not values:
        return {"n": 0, "mean": None, "p99": None, "max": None}
    from gpu_parity import error_stats

    s = error_stats([values])
    return {"n": s.tokens, "mean": s.mean, "p99": s.p99, "max": s.max}


def _raw_and_normalized(errors: list[float], sensitivity: list[float], min_sensitivity: float) -> dict:
    """:func:`_stats` of ``errors`` and of ``error / (1 - p)`` over the tokens with ``1 - p`` at
    least ``min_sensitivity``."""
    return {"raw": _stats(errors),
            "normalized": _stats([e / s for e, s in zip(errors, sensitivity) if s >= min_sensitivity])}


def by_path(errors: list[list[float]], sensitivity: list[list[float]], min_sensitivity: float,
            rounds: list[int] | None) -> dict:
    """Raw and normalized statistics where each kernel path ran: a prompt's first generated token
    comes from the prefill's logits, the others from decode steps; and per round of the report
    (``rounds``: consecutive prompt counts; on a GPU the first round's decode batch runs
    FlashAttention over the pools, the smaller ones the small-decode path: the fused Triton
    decode, since session 27 with the F heads on FlashAttention 3 over bf16 pools)."""
    def pick(rows: range, first: bool) -> dict:
        sel = [(e, s) for i in rows for j, (e, s) in enumerate(zip(errors[i], sensitivity[i])) if (j == 0) == first]
        return _raw_and_normalized([e for e, _ in sel], [s for _, s in sel], min_sensitivity)

    everything = range(len(errors))
    out = {"prefill_token": pick(everything, True), "decode": pick(everything, False)}
    start = 0
    for k, n in enumerate(rounds or []):
        out[f"round{k}_decode"] = pick(range(start, start + n), False)
        start += n
    return out


def variant_tail(errors: list[list[float]], reference: list[list[float]], min_sensitivity: float,
                 rounds: list[int] | None = None) -> dict:
    """Tail statistics of one engine: ``errors`` and ``reference`` (float32 logprobs) per prompt,
    token by token, with :func:`by_path`."""
    sensitivity = [[1.0 - math.exp(r) for r in row] for row in reference]
    flat = [e for row in errors for e in row]
    per_1024 = 1024 / max(len(flat), 1)
    return {**_raw_and_normalized(flat, [s for row in sensitivity for s in row], min_sensitivity),
            "above_0.04_per_1024": sum(e > 0.04 for e in flat) * per_1024,
            "above_0.05_per_1024": sum(e > 0.05 for e in flat) * per_1024,
            "mean_sensitivity": sum(s for row in sensitivity for s in row) / max(len(flat), 1),
            "by_path": by_path(errors, sensitivity, min_sensitivity, rounds)}


def stock_run_to_run(a: dict, b: dict, stock: str) -> dict:
    """How much the ``stock`` engine's logprobs moved between reports ``a`` and ``b`` (same
    prompts): over the prompts that generated the same tokens, the share of tokens whose logprob
    differs and the largest and mean |difference|; and whether both runs computed the same batches
    (None for reports without schedules)."""
    oa, ob = a["outputs"][stock], b["outputs"][stock]
    same = [i for i, (x, y) in enumerate(zip(oa["tokens"], ob["tokens"])) if x == y]
    diffs = [abs(x - y) for i in same for x, y in zip(oa["logprobs"][i], ob["logprobs"][i])]
    return {"prompts": len(oa["tokens"]), "prompts_with_same_tokens": len(same),
            # reports since session 21 record each engine's batches: equal ones should give equal logprobs
            "same_schedule": oa["schedule"] == ob["schedule"] if "schedule" in oa and "schedule" in ob else None,
            "tokens_compared": len(diffs), "share_differing": sum(d > 0 for d in diffs) / max(len(diffs), 1),
            "max_abs_diff": max(diffs, default=0.0), "mean_abs_diff": sum(diffs) / max(len(diffs), 1),
            "stock_max_error": [a["stats"][stock]["max"], b["stats"][stock]["max"]],
            "stock_mean_error": [a["stats"][stock]["mean"], b["stats"][stock]["mean"]]}


def router_margins(model_dir: Path, report: dict, variant: str, top: int = 5) -> dict:
    """For ``variant`` of an MoE ``report``: per generated token, the smallest gap over the MoE
    layers between the k-th and (k+1)-th router logit (k: experts per token), from the float32
    model with the reference attention under the variant's allocation; the ``top`` largest errors
    with their margins and the share of all tokens whose margin is smaller."""
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.allocation import Allocation
    from consa_vllm.reference import patch_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not routers:
        raise ValueError(f"--model {model_dir}: no MoE router in this model (a {type(model).__name__})")
    spec = report["variants"][variant]["allocation"]
    if spec is not None:
        alloc = Allocation(**spec)
        patch_model(model, window=alloc.window, allocation=alloc)
    k = model.config.num_experts_per_tok
    logits: list = []
    hooks = [r.register_forward_hook(lambda mod, args, out: logits.append(out[0].detach())) for r in routers]
    margins: list[list[float]] = []
    with torch.no_grad():
        for p, toks in zip(report["prompts"], report["outputs"][variant]["tokens"]):
            logits.clear()
            model(torch.tensor([p + toks]))
            rows = slice(len(p) - 1, len(p) - 1 + len(toks))  # the positions that predicted each token
            gaps = [torch.sort(lg[rows], dim=-1, descending=True).values for lg in logits]
            margins.append(torch.stack([g[:, k - 1] - g[:, k] for g in gaps]).min(0).values.tolist())
    for h in hooks:
        h.remove()
    flat = sorted(m for row in margins for m in row)
    errors = report["per_token"][variant]
    worst = sorted(((e, i, j) for i, row in enumerate(errors) for j, e in enumerate(row)), reverse=True)[:top]
    return {"median_margin": flat[len(flat) // 2],
            "largest_errors": [{"prompt": i, "token": j, "error": e, "margin": margins[i][j],
                                "share_of_tokens_with_smaller_margin": sum(m < margins[i][j] for m in flat) / len(flat)}
                               for e, i, j in worst]}


def permutation_p(a: list[float], b: list[float], draws: int = 20000) -> float:
    """One-sided p of ``mean(a) - mean(b)`` under exchangeable labels: the share of relabelings of
    the pooled values with a difference at least the observed one (every relabeling when there are
    at most ``draws``, else ``draws`` seeded random ones)."""
    import random
    from math import comb

    pooled, k = a + b, len(a)
    observed = sum(a) / k - sum(b) / len(b)
    total = sum(pooled)

    def diff(idx) -> float:
        s = sum(pooled[i] for i in idx)
        return s / k - (total - s) / len(b)

    if comb(len(pooled), k) <= draws:
        picks = list(combinations(range(len(pooled)), k))
    else:
        rng = random.Random(0)
        picks = [rng.sample(range(len(pooled)), k) for _ in range(draws)]
    return sum(diff(idx) >= observed - 1e-12 for idx in picks) / len(picks)


def sign_flip_p(d: list[float]) -> float:
    """One-sided p of ``mean(d) > 0`` for paired differences ``d``: the share of the ``2**len(d)``
    sign assignments whose mean is at least the observed one (exact; the observed one counts)."""
    from itertools import product

    observed = sum(d) / len(d)
    flips = list(product((1, -1), repeat=len(d)))
    return sum(sum(s * x for s, x in zip(signs, d)) / len(d) >= observed - 1e-12 for signs in flips) / len(flips)


def stock_model(rep: dict, stock: str) -> str | None:
    """What makes two reports' ``stock`` engines the same engine on the same weights, whatever
    prompts they served (engine options and weight fingerprints), as a comparable key; None when
    the report has no such engine."""
    if stock not in rep["outputs"]:
        return None
    return json.dumps([rep.get("engine"), rep["outputs"][stock].get("weight_fingerprints")], sort_keys=True)


def stock_engine(rep: dict, stock: str) -> str | None:
    """:func:`stock_model` on the same prompts: the same stock engine run again."""
    model = stock_model(rep, stock)
    return None if model is None else json.dumps([rep.get("prompts"), model])


def pooled_prompts(reps: list[dict], variant: str, stock: str) -> dict | None:
    """Every run's prompts as one sample: :func:`gpu_parity.paired` (the paired bootstrap the
    reports use per run) of the per-prompt mean |dlogprob|, ``variant`` minus ``stock``, each
    run's two engines on the same prompts. More prompts than one run's, so it resolves smaller
    mean differences than the sign flips over a few runs can (whose smallest p is ``2**-runs``).
    None without both engines' per-token errors on the same prompts in every run."""
    from gpu_parity import paired

    if not all(variant in (t := r.get("per_token", {})) and stock in t and len(t[variant]) == len(t[stock])
               for r in reps):
        return None
    d = paired([e for r in reps for e in r["per_token"][variant]], [e for r in reps for e in r["per_token"][stock]])
    return {"prompts": sum(len(r["per_token"][stock]) for r in reps), "mean_difference": d["diff"],
            "low": d["low"], "high": d["high"], "p_value": d["p_value"]}


def plain_hf_ratios(reps: list[dict], variant: str, stock: str, served_mean_ratio: float) -> dict | None:
    """The same ratios of summed means and maxima for plain Hugging Face in bf16 (no vLLM) on each
    engine's own tokens (the reports' ``plain_hf_bf16``): how much more bf16 moves the allocation's
    model than the all-F model by itself. ``served_over_plain_hf_mean`` divides the served mean
    ratio by it: at or below 1.0, serving adds no error beyond the model's own sensitivity."""
    hf = [r.get("plain_hf_bf16") or {} for r in reps]
    if not all(variant in h and stock in h for h in hf):
        return None
    mean = sum(h[variant]["mean"] for h in hf) / sum(h[stock]["mean"] for h in hf)
    return {"mean_ratio_of_sums": mean,
            "max_ratio_of_sums": sum(h[variant]["max"] for h in hf) / sum(h[stock]["max"] for h in hf),
            "served_over_plain_hf_mean": served_mean_ratio / mean}


def across_runs(reports: dict[str, dict], stock: str) -> list[dict]:
    """Reports grouped by their :func:`stock_model`; for each group of two or more, stock's and
    every allocation's maxima and means run by run, :func:`permutation_p` of an allocation's runs
    against stock's, :func:`sign_flip_p` of the per-run differences (the runs where both
    engines were served), :func:`pooled_prompts` and :func:`plain_hf_ratios`."""
    groups: dict[str, list[str]] = {}
    for name, rep in reports.items():
        if (key := stock_model(rep, stock)) is not None:
            groups.setdefault(key, []).append(name)
    out = []
    for names in groups.values():
        if len(names) < 2:
            continue
        base = [reports[n]["stats"][stock] for n in names]
        entry = {"reports": names,
                 "same_prompts": len({json.dumps(reports[n].get("prompts")) for n in names}) == 1,
                 "stock": {"max": [r["max"] for r in base], "mean": [r["mean"] for r in base]},
                 "variants": {}}
        for v in dict.fromkeys(v for n in names for v in reports[n]["stats"] if v != stock):
            both = [n for n in names if v in reports[n]["stats"]]
            reps = [reports[n] for n in both]
            mx = [r["stats"][v]["max"] for r in reps]
            mn = [r["stats"][v]["mean"] for r in reps]
            smx = [r["stats"][stock]["max"] for r in reps]
            smn = [r["stats"][stock]["mean"] for r in reps]
            entry["variants"][v] = {
                "reports": both, "max": mx, "mean": mn,
                "max_ratio_of_sums": sum(mx) / sum(smx), "mean_ratio_of_sums": sum(mn) / sum(smn),
                "p_max_above_stock": permutation_p(mx, entry["stock"]["max"]),
                "p_mean_above_stock": permutation_p(mn, entry["stock"]["mean"]),
                "paired_p_max_above_stock": sign_flip_p([a - b for a, b in zip(mx, smx)]),
                "paired_p_mean_above_stock": sign_flip_p([a - b for a, b in zip(mn, smn)]),
                "pooled_prompts": pooled_prompts(reps, v, stock),
                "plain_hf_bf16": plain_hf_ratios(reps, v, stock, sum(mn) / sum(smn))}
        out.append(entry)
    return out


def analyse(reports: dict[str, dict], stock: str, min_sensitivity: float) -> dict:
    """Every report's per-engine tails, each engine's ratios to the report's ``stock`` engine,
    and stock's run-to-run difference between every two reports of the same stock engine."""
    out: dict = {"min_sensitivity": min_sensitivity, "reports": {}, "stock_run_to_run": {}}
    for name, rep in reports.items():
        tails = {v: variant_tail(rep["per_token"][v], rep["outputs"][v]["reference"], min_sensitivity,
                                 rep.get("rounds"))
                 for v in rep["per_token"]}
        if stock in tails:
            base = tails[stock]
            for v, t in tails.items():
                if v != stock:
                    t["vs_stock"] = {f"{kind}_{s}": t[kind][s] / base[kind][s]
                                     for kind in ("raw", "normalized") for s in ("mean", "p99", "max")
                                     if base[kind][s]}
                    t["vs_stock"]["max_by_path"] = {
                        path: {kind: st[kind]["max"] / b[kind]["max"] for kind in ("raw", "normalized")
                               if st[kind]["max"] is not None and b[kind]["max"]}
                        for path, st in t["by_path"].items() if (b := base["by_path"].get(path))}
        out["reports"][name] = tails
    engines = {name: stock_engine(rep, stock) for name, rep in reports.items()}  # each report's prompts dumped once
    for (na, a), (nb, b) in combinations(reports.items(), 2):
        if engines[na] is not None and engines[na] == engines[nb]:
            out["stock_run_to_run"][f"{na} vs {nb}"] = stock_run_to_run(a, b, stock)
    out["across_runs"] = across_runs(reports, stock)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="parity report JSON files (run_variants' format)")
    ap.add_argument("--stock", default="stock_all_f", help="the variant every other one is compared with")
    ap.add_argument("--min-sensitivity", type=float, default=0.05,
                    help="normalized statistics over tokens with 1 - p at least this (tokens the model is sure of carry no signal)")
    ap.add_argument("--model", type=Path,
                    help="the float32 MoE checkpoint the reports served: router margins at the largest errors")
    ap.add_argument("--out", type=Path, help="also write the analysis as JSON here")
    a = ap.parse_args(argv)
    if a.model is not None and not (a.model / "config.json").is_file():
        ap.error(f"--model {a.model}: no config.json there (a local HF checkpoint directory is needed)")
    if not 0 < a.min_sensitivity < 1:
        ap.error(f"--min-sensitivity must be between 0 and 1, got {a.min_sensitivity}")
    reports: dict[str, dict] = {}
    # Named by file stem where the stems differ, else every report by its path (plan C''s runs
    # are all r<K>/checkpoint.json): one scheme for all the reports of one analysis.
    by_stem = len({p.stem for p in a.reports}) == len(a.reports)
    for path in a.reports:
        try:
            rep = json.loads(path.read_text())
        except FileNotFoundError:
            ap.error(f"report {path}: no such file")
        except ValueError as e:
            ap.error(f"report {path}: not JSON ({e})")
        missing = [k for k in ("per_token", "outputs", "stats") if k not in rep]
        if missing:
            ap.error(f"report {path}: no {', '.join(repr(k) for k in missing)}; not a parity report with engine outputs")
        reports[path.stem if by_stem else str(path)] = rep
    res = analyse(reports, a.stock, a.min_sensitivity)
    if a.model is not None:
        for name, rep in reports.items():
            for v in rep["per_token"]:
                try:
                    r = res["reports"][name][v]["router"] = router_margins(a.model, rep, v)
                except ValueError as e:
                    sys.exit(f"parity_tail: {e}")
                print(f"  router {name} {v}: median margin {r['median_margin']:.4f}; largest errors (error, margin, "
                      "share of tokens with a smaller margin): " + ", ".join(
                          f"({x['error']:.3f}, {x['margin']:.4f}, {x['share_of_tokens_with_smaller_margin']:.3f})"
                          for x in r["largest_errors"]), flush=True)
    for name, tails in res["reports"].items():
        print(f"== {name}")
        for v, t in tails.items():
            r, n = t["raw"], t["normalized"]
            ratio = t.get("vs_stock", {})
            print(f"  {v:40s} raw mean {r['mean']:.3e} p99 {r['p99']:.4f} max {r['max']:.4f} "
                  f"(>0.05: {t['above_0.05_per_1024']:.1f}/1024) | /(1-p) mean {n['mean']:.4f} p99 {n['p99']:.4f} "
                  f"max {n['max']:.4f}" + (f" | vs stock: raw max {ratio['raw_max']:.2f}x, normalized max "
                                           f"{ratio['normalized_max']:.2f}x, p99 {ratio['normalized_p99']:.2f}x; max by "
                                           "path (raw, normalized) " + ", ".join(
                                               f"{p} {x.get('raw', math.nan):.2f}x {x.get('normalized', math.nan):.2f}x"
                                               for p, x in ratio["max_by_path"].items())
                                           if ratio else ""))
    for pair, d in res["stock_run_to_run"].items():
        print(f"stock run to run, {pair}: same batches {d['same_schedule']}; "
              f"{d['prompts_with_same_tokens']}/{d['prompts']} prompts with the same tokens; "
              f"{100 * d['share_differing']:.0f}% of their logprobs differ, max {d['max_abs_diff']:.4f}, "
              f"mean {d['mean_abs_diff']:.2e}")
    for g in res["across_runs"]:
        print(f"across runs ({', '.join(g['reports'])}; {'same' if g['same_prompts'] else 'other'} prompts): "
              f"stock max {[round(x, 4) for x in g['stock']['max']]}")
        for v, r in g["variants"].items():
            print(f"  {v:40s} max {[round(x, 4) for x in r['max']]} ({r['max_ratio_of_sums']:.3f}x stock's; p above "
                  f"stock {r['p_max_above_stock']:.3f}, paired {r['paired_p_max_above_stock']:.3f}); mean "
                  f"{r['mean_ratio_of_sums']:.3f}x (p {r['p_mean_above_stock']:.3f}, paired "
                  f"{r['paired_p_mean_above_stock']:.3f})")
            if (pp := r["pooled_prompts"]) is not None:
                print(f"  {'':40s} pooled over {pp['prompts']} prompts: mean difference {pp['mean_difference']:.2e} "
                      f"[{pp['low']:.2e}, {pp['high']:.2e}], p {pp['p_value']:.3f}")
            if (hf := r["plain_hf_bf16"]) is not None:
                print(f"  {'':40s} plain HF bf16 (no vLLM): mean {hf['mean_ratio_of_sums']:.3f}x, max "
                      f"{hf['max_ratio_of_sums']:.3f}x; served mean over it {hf['served_over_plain_hf_mean']:.3f}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
