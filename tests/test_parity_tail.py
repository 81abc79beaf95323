"""benchmarks/parity_tail.py: the tail of a parity report's token errors, raw and per unit of
sensitivity, stock's run-to-run difference, and MoE router margins at the largest errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.parity_tail import analyse, permutation_p, router_margins, sign_flip_p, variant_tail

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parity_tail.py"


def _report(stock_lps: list[list[float]], engine: dict | None = None) -> dict:
    """A two-variant report in run_variants' format: two prompts, stock and a ConSA variant."""
    ref = [[math.log(0.5), math.log(0.9)], [math.log(0.99)]]
    return {"prompts": [[1, 2, 3], [4, 5]], "engine": engine or {"dtype": "bfloat16"},
            "stats": {"stock_all_f": {"mean": 0.01, "max": 0.02}, "consa": {"mean": 0.01, "max": 0.06}},
            "per_token": {"stock_all_f": [[0.02, 0.001], [0.0]], "consa": [[0.06, 0.002], [0.0005]]},
            "outputs": {v: {"tokens": [[7, 8], [9]], "logprobs": stock_lps if v == "stock_all_f" else [[-0.7, -0.1], [0.0]],
                            "reference": ref, "weight_fingerprints": {"w": 1}} for v in ("stock_all_f", "consa")},
            "variants": {"stock_all_f": {"allocation": None}, "consa": {"allocation": None}}}


def test_variant_tail_raw_and_per_unit_of_sensitivity():
    t = variant_tail([[0.06, 0.002], [0.0005]], [[math.log(0.5), math.log(0.9)], [math.log(0.99)]], 0.05)
    assert t["raw"]["n"] == 3 and t["raw"]["max"] == 0.06 and t["raw"]["mean"] == pytest.approx(0.0625 / 3)
    assert t["above_0.05_per_1024"] == pytest.approx(1024 / 3) and t["above_0.04_per_1024"] == pytest.approx(1024 / 3)
    # 1 - p: 0.5, 0.1 and 0.01; the last is below --min-sensitivity and left out.
    assert t["normalized"]["n"] == 2
    assert t["normalized"]["max"] == pytest.approx(0.12) and t["normalized"]["mean"] == pytest.approx((0.12 + 0.02) / 2)


def test_by_path_splits_prefill_token_decode_and_rounds():
    errs = [[0.01, 0.05, 0.02], [0.03, 0.04], [0.09, 0.001]]
    # 1 - p = 0.5 everywhere but the second prompt's decode token (0.01, below --min-sensitivity)
    ref = [[math.log(0.5)] * 3, [math.log(0.5), math.log(0.99)], [math.log(0.5)] * 2]
    t = variant_tail(errs, ref, 0.05, rounds=[2, 1])["by_path"]
    raw = {p: (x["raw"]["max"], x["raw"]["n"]) for p, x in t.items()}
    assert raw == {"prefill_token": (0.09, 3), "decode": (0.05, 4), "round0_decode": (0.05, 3),
                   "round1_decode": (0.001, 1)}
    norm = {p: (x["normalized"]["max"], x["normalized"]["n"]) for p, x in t.items()}
    assert norm == {"prefill_token": (pytest.approx(0.18), 3), "decode": (pytest.approx(0.1), 3),
                    "round0_decode": (pytest.approx(0.1), 2), "round1_decode": (pytest.approx(0.002), 1)}


def test_analyse_ratios_and_stock_run_to_run_only_for_the_same_engine():
    a = _report([[-0.70, -0.10], [0.0]])
    b = _report([[-0.75, -0.10], [0.0]])
    other_engine = _report([[-0.70, -0.10], [0.0]], engine={"dtype": "bfloat16", "kv_cache_dtype": "fp8"})
    res = analyse({"a": a, "b": b, "fp8": other_engine}, "stock_all_f", 0.05)
    assert res["reports"]["a"]["consa"]["vs_stock"]["raw_max"] == pytest.approx(3.0)
    # 1 - p is 0.5 on the first tokens and 0.1 on the decode one: the same ratios per unit of it
    assert res["reports"]["a"]["consa"]["vs_stock"]["max_by_path"] == {
        "prefill_token": {"raw": pytest.approx(3.0), "normalized": pytest.approx(3.0)},
        "decode": {"raw": pytest.approx(2.0), "normalized": pytest.approx(2.0)}}
    assert "vs_stock" not in res["reports"]["a"]["stock_all_f"]
    assert list(res["stock_run_to_run"]) == ["a vs b"]  # a stock engine with other options is another engine
    d = res["stock_run_to_run"]["a vs b"]
    assert d["prompts_with_same_tokens"] == 2 and d["tokens_compared"] == 3
    assert d["share_differing"] == pytest.approx(1 / 3) and d["max_abs_diff"] == pytest.approx(0.05)
    assert d["same_schedule"] is None  # reports before session 21 have no schedules
    for rep, first in ((a, [[0, 3], [1, 2]]), (b, [[0, 3]])):
        rep["outputs"]["stock_all_f"]["schedule"] = [first, [[0, 1], [1, 1]]]
    assert analyse({"a": a, "b": b}, "stock_all_f", 0.05)["stock_run_to_run"]["a vs b"]["same_schedule"] is False


def test_permutation_p_exact_and_sampled():
    assert permutation_p([3.0], [1.0, 2.0]) == pytest.approx(1 / 3)  # the largest of three: 1 relabeling of 3
    assert permutation_p([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert permutation_p([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0, 0.5]) == pytest.approx(1 / 126)  # C(9, 4)
    # Past ``draws`` relabelings: seeded random ones, the same answer every time.
    a, b = [float(x) for x in range(10, 20)], [float(x) for x in range(12)]
    assert permutation_p(a, b, draws=500) == permutation_p(a, b, draws=500) < 0.01


def test_across_runs_judges_an_allocation_against_stocks_own_runs():
    runs = {f"r{k}": _report([[-0.7 - k / 100, -0.1], [0.0]]) for k in range(3)}
    for k, rep in enumerate(runs.values()):
        rep["stats"]["stock_all_f"]["max"] = 0.02 + k / 1000
        rep["stats"]["consa"]["max"] = 0.03 + k / 1000
    runs["fp8"] = _report([[-0.7, -0.1], [0.0]], engine={"kv_cache_dtype": "fp8"})  # another stock engine: alone
    groups = analyse(runs, "stock_all_f", 0.05)["across_runs"]
    assert len(groups) == 1 and groups[0]["reports"] == ["r0", "r1", "r2"]
    g = groups[0]
    assert g["stock"]["max"] == [0.02, 0.021, 0.022] and g["variants"]["consa"]["max"] == [0.03, 0.031, 0.032]
    assert g["variants"]["consa"]["p_max_above_stock"] == pytest.approx(1 / 20)  # C(6, 3), only the observed split
    assert g["same_prompts"] and g["variants"]["consa"]["max_ratio_of_sums"] == pytest.approx(0.093 / 0.063)
    # paired: three positive differences, only the all-positive signs reach their mean
    assert g["variants"]["consa"]["paired_p_max_above_stock"] == pytest.approx(1 / 8)


def test_across_runs_on_other_prompts_pairs_each_run():
    """PROMPT_SEEDS runs: the same stock engine and weights on other prompts each run are one
    group; each run's ConSA maximum is set against that run's stock maximum."""
    runs = {f"p{k}": _report([[-0.7, -0.1], [0.0]]) for k in range(4)}
    for k, rep in enumerate(runs.values()):
        rep["prompts"] = [[k, 1, 2], [4, 5]]
        rep["stats"]["stock_all_f"]["max"] = 0.02 * (k + 1)  # prompts that differ in difficulty
        rep["stats"]["consa"]["max"] = 0.02 * (k + 1) + (0.001 if k else -0.001)
    del runs["p3"]["stats"]["consa"]  # a run without the variant: left out of its pairs
    g = analyse(runs, "stock_all_f", 0.05)["across_runs"]
    assert len(g) == 1 and not g[0]["same_prompts"] and g[0]["stock"]["max"] == [0.02, 0.04, 0.06, 0.08]
    v = g[0]["variants"]["consa"]
    assert v["reports"] == ["p0", "p1", "p2"] and v["max"] == pytest.approx([0.019, 0.041, 0.061])
    # unpaired, the stock runs' spread hides the excess; paired: differences -1, +1, +1 (x 1e-3)
    assert v["p_max_above_stock"] > 0.5
    assert v["paired_p_max_above_stock"] == pytest.approx(4 / 8)


def test_sign_flip_p_exact():
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(1 / 8)
    assert sign_flip_p([-1.0, -2.0]) == 1.0
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(3 / 4)  # mean 0: every assignment but (-, +) ties or beats it


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_margins_on_a_real_moe(tiny_model, family):
    """Router margins come from the real HF routers of each MoE family, under the variant's
    allocation; the largest errors are ranked among every token's margin."""
    src = tiny_model(family)
    rep = _report([[-0.7, -0.1], [0.0]])
    rep["variants"]["consa"]["allocation"] = {"granularity": "kv_head", "window": 2, "pattern": ["FS"] * 4, "sink": 1}
    r = router_margins(src, rep, "consa", top=2)
    assert [(x["prompt"], x["token"]) for x in r["largest_errors"]] == [(0, 0), (0, 1)]
    for x in r["largest_errors"]:
        assert x["margin"] >= 0 and 0 <= x["share_of_tokens_with_smaller_margin"] < 1
    with pytest.raises(ValueError, match="no MoE router"):
        router_margins(tiny_model("qwen3"), rep, "stock_all_f")


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    good = tmp_path / "r.json"
    good.write_text(json.dumps(_report([[-0.7, -0.1], [0.0]])))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stats": {}}))
    for args, msg in (([str(tmp_path / "none.json")], "none.json: no such file"),
                      ([str(bad)], "bad.json: no 'per_token', 'outputs'; not a parity report"),
                      ([str(good), "--min-sensitivity", "1.5"], "--min-sensitivity must be between 0 and 1"),
                      ([str(good), "--model", str(tmp_path)], "no config.json there")):
        r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1], (args, r.stderr)
    out = tmp_path / "tail.json"
    r = subprocess.run([sys.executable, str(SCRIPT), str(good), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["reports"]["r"]["consa"]["raw"]["max"] == 0.06


def test_across_runs_pools_prompts_and_divides_by_plain_hf_sensitivity():
    """A mean excess that plain Hugging Face bf16 shows too is the model's sensitivity, not the
    serving path: the served ratio over HF's comes out at 1.0; the pooled prompts' bootstrap sees
    the variant's larger per-prompt errors in every run."""
    runs = {f"p{k}": _report([[-0.7, -0.1], [0.0]]) for k in range(3)}
    for k, rep in enumerate(runs.values()):
        rep["prompts"] = [[k, 1, 2], [4, 5]]
        rep["stats"]["consa"]["mean"] = 0.012  # 1.2x stock's 0.01 in every run
        rep["plain_hf_bf16"] = {"stock_all_f": {"mean": 0.02, "max": 0.1}, "consa": {"mean": 0.024, "max": 0.05}}
    v = analyse(runs, "stock_all_f", 0.05)["across_runs"][0]["variants"]["consa"]
    assert v["mean_ratio_of_sums"] == pytest.approx(1.2)
    hf = v["plain_hf_bf16"]
    assert hf["mean_ratio_of_sums"] == pytest.approx(1.2) and hf["max_ratio_of_sums"] == pytest.approx(0.5)
    assert hf["served_over_plain_hf_mean"] == pytest.approx(1.0)
    pp = v["pooled_prompts"]  # per-prompt means: consa 0.031, 0.0005; stock 0.0105, 0.0 (three runs, six prompts)
    assert pp["prompts"] == 6 and pp["mean_difference"] == pytest.approx((0.0205 + 0.0005) / 2)
    assert pp["low"] > 0  # every prompt's difference is positive
    del runs["p1"]["plain_hf_bf16"]  # a run without HF's errors: no ratio rather than a partial one
    assert analyse(runs, "stock_all_f", 0.05)["across_runs"][0]["variants"]["consa"]["plain_hf_bf16"] is None
