"""``benchmarks/bf16_sensitivity.py --model``: a local checkpoint under allocation files against
its all-F model, on ``engine_harness.text_prompts`` (the prompts tests/test_gpu_checkpoint.py
serves on a GPU), and its one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine_harness import text_prompts

from consa_vllm.allocation import Allocation

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bf16_sensitivity.py"


def test_text_prompts_are_exact_repeatable_cuts_of_the_repository(tiny_model):
    src = tiny_model("qwen3")
    prompts, used = text_prompts(src, [40, 90, 40])
    assert [len(p) for p in prompts] == [40, 90, 40]
    again, used_again = text_prompts(src, [40, 90, 40])
    assert again == prompts and used_again == used
    other, _ = text_prompts(src, [40, 90, 40], seed=1)
    assert other != prompts
    assert all(u.startswith("consa_vllm/") and u.endswith("]") for u in used)
    # each prompt is the tokenizer's own ids of the named slice's file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    name, span = used[1][:-1].split("[")
    start, stop = (int(x) for x in span.split(":"))
    assert tok((ROOT / name).read_text())["input_ids"][start:stop] == prompts[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_checkpoint_mode_measures_each_allocation_against_all_f(tiny_model, tmp_path):
    src = tiny_model("qwen3")  # 4 layers, 2 KV heads (consa_vllm.tiny defaults)
    shape = json.loads((src / "config.json").read_text())
    layers, kv = shape["num_hidden_layers"], shape["num_key_value_heads"]
    uneven = tmp_path / "uneven.json"
    Allocation(granularity="kv_head", window=16, sink=2,
               pattern=["S" * kv] + ["F" * kv] * (layers - 1)).save(uneven)
    out = tmp_path / "out.json"
    r = _run("--model", str(src), "--allocations", str(uneven), "--prompts", "3", "--new", "3",
             "--lengths", "40,64", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["prompts"] == 3 and len(res["prompt_sources"]) == 3
    row = res["allocations"]["uneven"]
    assert row["window"] == 16 and row["sink"] == 2 and row["s_share"] == 1 / layers
    assert row["mean"] > 0 and res["all_f"]["mean"] > 0
    assert abs(row["ratio_vs_all_f"] - row["mean"] / res["all_f"]["mean"]) < 1e-9


def test_checkpoint_mode_refuses_bad_input_in_one_line(tiny_model, tmp_path):
    src = tiny_model("qwen3")
    wrong = tmp_path / "wrong.json"
    Allocation(granularity="kv_head", window=16, pattern=["FS"] * 7).save(wrong)
    out = tmp_path / "out.json"
    r = _run("--model", str(src), "--allocations", str(wrong), "--out", str(out))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "wrong.json" in r.stderr and "7 layers" in r.stderr
    r = _run("--model", str(src), "--out", str(out))
    assert r.returncode == 2 and "--model and --allocations go together" in r.stderr
    for flags, msg in ((["--lengths", "600,x"], "--lengths must be a comma list of whole numbers of tokens, got '600,x'"),
                       (["--lengths", "0"], "--lengths must be a comma list of whole numbers of tokens, got '0'"),
                       (["--prompts", "0"], "--prompts and --new must be at least 1, got 0 and 32")):
        r = _run("--model", str(src), "--allocations", str(wrong), *flags, "--out", str(out))
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(msg)
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "wrong.json"
    Allocation(granularity="kv_head", window=16, pattern=["FS"] * 4).save(twin)
    r = _run("--model", str(src), "--allocations", f"{twin},{wrong}", "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "two files have the same name" in r.stderr
    assert not out.exists()


def test_attn_scales_measure_each_family_at_each_scale(tmp_path):
    out = tmp_path / "out.json"
    r = _run("--families", "qwen3", "--attn-scales", "1,2", "--prompts", "1", "--new", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    fams = json.loads(out.read_text())["families"]
    assert sorted(fams) == ["qwen3", "qwen3 x2"]
    assert fams["qwen3"]["attn_scale"] == 1 and fams["qwen3 x2"]["attn_scale"] == 2
    for entry in fams.values():
        assert entry["allocations"]["all_f"]["ratio_vs_all_f"] == 1
        assert all(a["mean"] > 0 for a in entry["allocations"].values())
    # another model: its errors differ
    assert fams["qwen3"]["allocations"]["all_f"]["mean"] != fams["qwen3 x2"]["allocations"]["all_f"]["mean"]


def test_scale_attention_logits_scales_the_query_where_it_is_not_normalised_away(tiny_model, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from gpu_parity import round_weights_to, scale_attention_logits

    for family, scaled in (("qwen3", "self_attn.q_norm.weight"), ("qwen2", "self_attn.q_proj.")):
        src = tmp_path / family
        shutil.copytree(tiny_model(family), src)
        before = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
        scale_attention_logits(src, 3.0)
        round_weights_to(src, "bfloat16")
        after = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
        hits = [k for k in before if scaled in k]
        assert hits and (family != "qwen2" or any(k.endswith("q_proj.bias") for k in hits))
        for k, v in before.items():
            want = v.bfloat16().float() if scaled not in k else (v * 3.0).bfloat16().float()
            assert torch.equal(after[k], want), k


def test_attn_scales_refused_in_one_line(tmp_path):
    out = tmp_path / "out.json"
    for value in ("0", "x", "nan", "-1", "1,inf"):
        r = _run("--attn-scales", value, "--out", str(out))
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].endswith(
            f"--attn-scales must be a comma list of positive numbers, got '{value}'")
    r = _run("--model", str(tmp_path), "--allocations", "a.json", "--attn-scales", "2", "--out", str(out))
    assert r.returncode == 2 and "--attn-scales applies to the tiny models, not to --model" in r.stderr
    assert not out.exists()
