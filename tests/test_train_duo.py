"""``python -m consa_vllm.train --method duo``: DuoAttention-style gates find a planted head.

The planted model is built, not trained: a randomly initialised tiny Qwen3 (4 layers, 2 KV heads,
head_dim 32) on the symbolic key-value vocabulary of ``tests/test_evidence_cpu.py``, whose value
projections are scaled by 0.1 in every KV head except one (layer 1, head 0). So that head's
output, and with it what its full attention reads beyond the window, moves the last hidden
states 10x more than any other head's. ``--method duo`` (weights frozen, distillation of the last
hidden states against the all-full model on passkey-style documents + L1 on the gates) must keep
that head's gate high while the L1 term pulls the others down, and, binarised at 7 of 8 heads S,
keep exactly it.

It fails when the distillation term does not reach the gates: measured with the same settings
on the model without the plant (all heads scaled 1.0), the gates end at 0.96-1.0 and the
allocation keeps layer 0, head 0 (tie order), not the planted head; with the plant they were
1.0 for the planted head and 0.31-0.56 for the others (15 s on CPU).
(A first design pretrained a model with only that head full; 300 CPU steps did not teach it
retrieval, 0.19 accuracy, and took 10 minutes under load.)
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.testbed.lm import build_model
from consa_vllm.allocation import Allocation
from consa_vllm.eval.tasks import build_word_tokenizer, symbolic_filler, symbolic_task, symbolic_vocab

ROOT = Path(__file__).resolve().parents[1]
T, W = 64, 8
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
PLANTED = ["SS", "FS", "SS", "SS"]  # the one head that matters: layer 1, KV head 0
QUIET = 0.1  # value-projection scale of every other head


def plant(root: Path, scale: float = QUIET) -> Path:
    """Build the planted model (module docstring) and a filler text beside it; returns the model directory."""
    v = symbolic_vocab(8, 8, 4)
    tok = build_word_tokenizer(v["keys"] + v["values"] + v["needles"] + v["filler"])
    model = build_model({**SHAPE, "vocab_size": len(tok)}, seed=0)
    d = SHAPE["head_dim"]
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for h in range(SHAPE["num_key_value_heads"]):
                if PLANTED[layer][h] == "S":
                    block.self_attn.v_proj.weight[h * d:(h + 1) * d] *= scale
    out = root / "planted"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (root / "filler.txt").write_text(symbolic_filler(v["filler"], 4000, seed=1))
    return out


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-repeatable reductions
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_duo_gates_find_the_planted_head(tmp_path, one_thread):
    from consa_vllm.train import TrainConfig
    from consa_vllm.train.duo import train_duo

    model = plant(tmp_path)
    cfg = TrainConfig(method="duo", model=str(model), data=[str(tmp_path / "filler.txt")], seq_len=T, window=W,
                      steps=60, batch_size=16, target_sparsity=7 / 8, constraint="global", gate_lr=0.05,
                      duo_l1=0.02, out=str(tmp_path / "duo.json"), device="cpu", progress=False)
    alloc = train_duo(cfg, tasks=[symbolic_task(8, 8)])
    gates = alloc.model_extra["training"]["gates"]
    print("\nduo gates:", json.dumps(gates))
    planted_gate = gates[1][0]
    others = [g for layer, row in enumerate(gates) for h, g in enumerate(row) if (layer, h) != (1, 0)]
    assert planted_gate - max(others) >= 0.3, gates
    assert alloc.pattern == PLANTED, alloc.pattern
    # The same file format as every other allocation, the gates as provenance.
    again = Allocation.load(tmp_path / "duo.json")
    assert again.pattern == PLANTED and again.model_extra["training"]["method"] == "duo"
    metrics = [json.loads(x) for x in (tmp_path / "duo.logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 60 and metrics[0]["mean_gate"] == 1.0


def test_duo_force_replaces_an_earlier_consa_runs_logs(tmp_path, tiny_model):
    """--method duo --force over the log folder of an earlier ConSA run: none of that run's files
    (checkpoints, TensorBoard events) stay beside the new run's (one removal step for both methods)."""
    from consa_vllm.train import TrainConfig, train

    data = tmp_path / "hay.txt"
    data.write_text(Path(random.__file__).read_text()[:60_000])
    common = dict(model=str(tiny_model()), data=[str(data)], seq_len=128, window=32, steps=2, batch_size=1,
                  target_sparsity=0.5, out=str(tmp_path / "a.json"), device="cpu", progress=False)
    train(TrainConfig(**common, checkpoint_every=1, freeze_weights=True))
    logs = tmp_path / "a.logs"
    assert {"checkpoints", "tensorboard", "metrics.jsonl"} <= {p.name for p in logs.iterdir()}
    alloc = train(TrainConfig(**common, method="duo", force=True))
    assert sorted(p.name for p in logs.iterdir()) == ["allocation.png", "curves.png", "metrics.jsonl"]
    assert [json.loads(x)["step"] for x in (logs / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert Allocation.load(tmp_path / "a.json").model_extra["training"]["method"] == "duo" == \
        alloc.model_extra["training"]["method"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consa_vllm.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_duo_cli_on_passkey_data_writes_the_allocation_format(tmp_path):
    """The command line, default tasks (passkey + key-value of ``consa-vllm eval``) on a tiny BPE model."""
    from consa_vllm.tiny import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(model)
    data = tmp_path / "hay.txt"
    data.write_text(Path(random.__file__).read_text()[:200_000])
    out = tmp_path / "a.json"
    r = run_cli("--method", "duo", "--model", str(model), "--data", str(data), "--seq-len", "256", "--window", "32",
                "--sink", "4", "--steps", "2", "--batch-size", "2", "--target-sparsity", "0.5",
                "--constraint", "per-layer", "--device", "cpu", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    a = Allocation.load(out)
    tr = a.model_extra["training"]
    assert a.sink == 4 and a.window == 32 and a.sparsity == 0.5
    assert all(row.count("S") == len(row) // 2 for row in a.pattern)
    assert tr["method"] == "duo" and tr["tasks"] == ["passkey", "kv"]
    assert len(tr["gates"]) == a.num_layers and all(0.0 <= g <= 1.0 for row in tr["gates"] for g in row)


@pytest.mark.parametrize("flags, named", [
    (["--stage2-steps", "5", "--save-model", "x"], "--stage2-steps, --save-model"),
    (["--granularity", "layer"], "--granularity"),
    (["--lagrangian-lr", "0.5"], "--lagrangian-lr"),
    (["--init-log-alpha", "1"], "--init-log-alpha"),
])
def test_duo_refuses_consa_only_flags_in_one_line(tmp_path, flags, named):
    from consa_vllm.tiny import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(model)
    r = run_cli("--method", "duo", "--model", str(model), "--data", str(model / "config.json"), "--seq-len", "256",
                "--window", "32", "--out", str(tmp_path / "a.json"), *flags)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "--method duo" in lines[0], r.stderr


def test_duo_l1_refused_for_consa(tmp_path):
    from consa_vllm.tiny import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(model)
    r = run_cli("--model", str(model), "--data", str(model / "config.json"), "--duo-l1", "0.1",
                "--out", str(tmp_path / "a.json"))
    assert r.returncode == 2 and r.stderr.strip() == "python -m consa_vllm.train: error: --duo-l1 applies to --method duo only", r.stderr
