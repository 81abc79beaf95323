"""FSDP2 under torchrun on CPU (gloo): same result as one process, resumable, stage 2 exported from the shards."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from consa_vllm.allocation import Allocation
from consa_vllm.export import read_exported_allocation
from consa_vllm.tiny import stdlib_python_files

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
PORT = "29547"  # not the DDP test's port: the two may run in parallel

pytestmark = pytest.mark.slow  # three torchrun training runs


def python(*args):
    return subprocess.run([sys.executable, "-m", "consa_vllm.train", *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=ENV)


def torchrun(*args):
    return subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", PORT, "-m", "consa_vllm.train",
                           *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV)


def weights(d):
    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """One process, FSDP on 2 ranks (checkpoints every 3 steps), and FSDP resumed from its stage-1 step 6."""
    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed")
    root = tmp_path_factory.mktemp("fsdp")
    model = tiny_model(num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in stdlib_python_files(6)))
    # Same global batch and the same micro-batches: 1 x (batch 1, accum 4) == 2 ranks x (batch 1, accum 2).
    # Joint training (weights too, lr 1e-3) so that the sharded weights' gradients matter; stage 2 exports.
    common = ["--model", model, "--data", data, "--seq-len", 64, "--window", 16, "--steps", 8, "--stage2-steps", 4,
              "--batch-size", 1, "--lr", 1e-3, "--no-progress", "--keep-checkpoints", 10]
    one = python(*common, "--grad-accum", 4, "--checkpoint-every", 0, "--out", root / "one.json",
                 "--save-model", root / "one_model")
    assert one.returncode == 0, one.stderr
    fsdp = torchrun(*common, "--grad-accum", 2, "--fsdp", "--checkpoint-every", 3, "--out", root / "fsdp.json",
                    "--save-model", root / "fsdp_model")
    assert fsdp.returncode == 0, fsdp.stderr
    # resume in a copy of the logs, from the stage-1 checkpoint at step 6 (as after a kill at step 7 or 8)
    shutil.copytree(root / "fsdp.logs", root / "resumed.logs")
    resumed = torchrun(*common, "--grad-accum", 2, "--fsdp", "--checkpoint-every", 3, "--out", root / "resumed.json",
                       "--log-dir", root / "resumed.logs", "--save-model", root / "resumed_model",
                       "--resume", root / "resumed.logs" / "checkpoints" / "step_00000006")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 6" in resumed.stderr
    return root, model


def test_fsdp_matches_one_process(runs):
    root, _ = runs
    a, b = Allocation.load(root / "one.json"), Allocation.load(root / "fsdp.json")
    assert b.training["world_size"] == 2 and b.training["args"]["fsdp"] is True
    assert a.training["tokens_stage1"] == b.training["tokens_stage1"]  # same global batch
    assert a.pattern == b.pattern
    la, lb = a.training["log_alpha"], b.training["log_alpha"]
    assert max(abs(x - y) for ra, rb in zip(la, lb) for x, y in zip(ra, rb)) < 1e-5
    for k in ("loss", "penalty"):
        assert abs(a.training["final"][k] - b.training["final"][k]) < 1e-4, k
    assert abs(a.training["final_stage2"]["loss"] - b.training["final_stage2"]["loss"]) < 1e-4
    # the loss curves agree step by step, stage 1 and 2
    h1, h2 = ([json.loads(l) for l in (root / f"{n}.logs" / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "fsdp"))
    assert [r["step"] for r in h2] == list(range(12))
    assert max(abs(r1["loss"] - r2["loss"]) for r1, r2 in zip(h1, h2)) < 1e-4


def test_fsdp_stage2_export_gathers_full_weights(runs):
    root, model = runs
    src, one, fsdp = weights(model), weights(root / "one_model"), weights(root / "fsdp_model")
    assert set(fsdp) == set(src) and all(fsdp[k].shape == src[k].shape for k in src)  # unsharded, every tensor
    moved = max((one[k] - src[k]).abs().max().item() for k in src)
    assert moved > 1e-3  # training changed the weights (~1.2e-2 here) ...
    # ... and FSDP the same way. Adam's g/sqrt(v) magnifies float32 summation-order noise on weights whose
    # gradients are ~0: DDP vs one process differs by 1.0e-4 here too. A missing gradient reduction would
    # differ by ~lr per step (~1e-2).
    assert max((fsdp[k] - one[k]).abs().max().item() for k in src) < 0.02 * moved
    conf = json.loads((root / "fsdp_model" / "config.json").read_text())
    assert conf["architectures"] == ["ConsaQwen3ForCausalLM"]
    assert read_exported_allocation(root / "fsdp_model").pattern == Allocation.load(root / "fsdp.json").pattern


def test_fsdp_resume_equals_uninterrupted(runs):
    root, _ = runs
    a, b = Allocation.load(root / "fsdp.json"), Allocation.load(root / "resumed.json")
    assert a.pattern == b.pattern
    assert a.training["log_alpha"] == b.training["log_alpha"]  # bitwise, as floats
    assert a.training["final"] == b.training["final"]
    assert a.training["final_stage2"] == b.training["final_stage2"]
    wa, wb = weights(root / "fsdp_model"), weights(root / "resumed_model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = ([json.loads(l) for l in (root / f"{n}.logs" / "metrics.jsonl").read_text().splitlines()]
              for n in ("fsdp", "resumed"))
    assert [r["step"] for r in hb] == list(range(12))
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


def test_fsdp_checkpoint_refused_without_fsdp(runs):
    """A --fsdp checkpoint keys optimizer state by parameter name; resuming it under DDP/1 process is refused."""
    root, model = runs
    r = python("--model", model, "--data", root / "data.jsonl", "--seq-len", 64, "--window", 16, "--steps", 8,
               "--stage2-steps", 4, "--batch-size", 1, "--lr", 1e-3, "--no-progress", "--grad-accum", 4,
               "--out", root / "x.json", "--save-model", root / "x_model",
               "--resume", root / "fsdp.logs" / "checkpoints" / "step_00000006")
    assert r.returncode == 2, r.stderr
    assert "made with --fsdp" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python -m consa_vllm.train: error: --resume")


def test_fsdp_needs_torchrun(runs):
    root, model = runs
    r = python("--model", model, "--data", root / "data.jsonl", "--fsdp", "--out", root / "y.json")
    assert r.returncode == 2
    assert "--fsdp shards the model over several processes: run under torchrun" in r.stderr
    assert not (root / "y.json").exists()
