"""``benchmarks/testbed/upcycle_moe.py``: a Qwen3-MoE made from a dense Qwen3 by sparse upcycling
computes the dense model's function until trained, continued pretraining runs and writes a
servable bf16 checkpoint, and bad input is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.testbed.upcycle_moe", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_upcycled_model_computes_the_dense_models_function(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from benchmarks.testbed.upcycle_moe import upcycle

    src = tiny_model("qwen3", num_layers=4, seed=5)
    dst = upcycle(src, tmp_path / "moe", experts=4, top_k=2, sparse_step=2, seed=1)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["decoder_sparse_step"]) == (4, 2, 2)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    kinds = [type(layer.mlp).__name__ for layer in moe.model.layers]
    assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"] * 2
    ids = torch.randint(0, dense.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    # Every expert is the dense MLP and the top-k weights sum to one: float32 rounding apart, equal.
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    # The routers are drawn, not zero: the experts are chosen per token, so training can tell them apart.
    router = moe.model.layers[1].mlp.gate.weight
    assert router.abs().max().item() > 0 and not torch.equal(router[0], router[1])


def test_continued_training_writes_a_bf16_moe_checkpoint(tiny_model, tmp_path):
    src = tiny_model("qwen3", num_layers=4, seed=5)
    text = tmp_path / "text"
    text.mkdir()
    for f in sorted((ROOT / "consa_vllm" / "allocation").glob("*.py")):
        (text / f.name).write_text(f.read_text())
    out = tmp_path / "run"
    r = _run("--model", str(src), "--out", str(out), "--data", str(text), "--steps", "3", "--seq-len", "64",
             "--batch", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["step"] == 3
    from safetensors import safe_open

    with safe_open(out / "continued" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert f.get_tensor(names[0]).dtype == torch.bfloat16
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names  # a dense layer keeps its MLP
    cfg = json.loads((out / "continued" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and not cfg.get("output_router_logits")
    assert (out / "continued" / "tokenizer.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"] == [str(text)] and "heldout" not in summary
    again = _run("--model", str(src), "--out", str(out), "--data", str(text), "--steps", "3")
    assert again.returncode == 0 and "continued-trained model" not in again.stdout  # done: nothing retrained


def test_refuses_bad_input_in_one_line(tiny_model, tmp_path):
    llama = tiny_model("llama")
    r = _run("--model", str(llama), "--out", str(tmp_path / "a"), "--steps", "0")
    assert r.returncode == 1 and "model_type 'llama'; upcycling takes a dense Qwen3 checkpoint" in r.stderr
    r = _run("--model", str(tmp_path / "none"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "no config.json there" in r.stderr.splitlines()[-1]
    r = _run("--model", str(llama), "--out", str(tmp_path / "c"), "--experts", "2", "--top-k", "3")
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("--top-k 3 exceeds --experts 2")
    src = tiny_model("qwen3", num_layers=4, seed=5)
    r = _run("--model", str(src), "--out", str(tmp_path / "d"), "--data", str(tmp_path / "missing"), "--steps", "2")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such file or directory" in r.stderr
