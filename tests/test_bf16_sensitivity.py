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
