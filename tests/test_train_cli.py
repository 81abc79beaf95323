"""``python -m consa_vllm.train`` as a user runs it: --help, end to end, clear errors, torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from consa_vllm.allocation import Allocation
from consa_vllm.tiny import stdlib_python_files

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args, timeout=240, cwd=None):
    return subprocess.run([sys.executable, "-m", "consa_vllm.train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model(num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in stdlib_python_files(6)))
    return model, data


def test_help():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--model", "--data", "--target-sparsity", "--granularity", "--constraint", "--window", "--steps",
                 "--batch-size", "--grad-accum", "--lr", "--gate-lr", "--lagrangian-lr", "--target-warmup",
                 "--freeze-weights", "--stage2-steps", "--save-model", "--out", "--resume", "--seed", "--device",
                 "--dtype", "--log-dir", "--allocation", "--fsdp"):
        assert flag in r.stdout


def test_end_to_end(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "res" / "alloc.json"
    r = run("--model", model, "--data", data, "--seq-len", 64, "--window", 16, "--steps", 30, "--batch-size", 2,
            "--freeze-weights", "--target-sparsity", 0.5, "--out", out, "--checkpoint-every", 10)
    assert r.returncode == 0, r.stderr
    a = Allocation.load(out)
    assert a.num_layers == 2 and a.num_kv_heads == 2 and a.sparsity == 0.5 and a.window == 16
    logs = tmp_path / "res" / "alloc.logs"
    assert {"metrics.jsonl", "allocation.png", "curves.png", "checkpoints"} <= {p.name for p in logs.iterdir()}
    assert (logs / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    # TensorBoard event files hold the same scalars as metrics.jsonl, one per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(logs / "tensorboard")).Reload()
    assert {"loss", "expected_sparsity", "target", "penalty", "tokens_per_s"} <= set(ev.Tags()["scalars"])
    hist = [json.loads(l) for l in (logs / "metrics.jsonl").read_text().splitlines()]
    tb_loss = ev.Scalars("loss")
    assert [e.step for e in tb_loss] == [r["step"] for r in hist] == list(range(30))
    assert max(abs(e.value - r["loss"]) for e, r in zip(tb_loss, hist)) < 1e-5  # float32 in the event file
    # the progress bar shows loss, sparsity, target and the multipliers
    assert all(k in r.stderr for k in ("stage 1", "loss=", "s=", "t=", "l1=", "l2="))


@pytest.mark.parametrize("extra,message", [
    (["--target-sparsity", "1.5"], "--target-sparsity must be in [0, 1], got 1.5"),
    (["--window", "0"], "--window must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--target-warmup", "2"], "--target-warmup is a fraction"),
    (["--granularity", "layer", "--constraint", "per-layer"], "--constraint per-layer needs --granularity kv_head"),
    (["--stage2-steps", "5"], "--stage2-steps needs --save-model"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: not a checkpoint directory"),
])
def test_bad_arguments(tiny, tmp_path, extra, message):
    model, data = tiny
    r = run("--model", model, "--data", data, "--out", tmp_path / "o" / "a.json", *extra)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.startswith("python -m consa_vllm.train: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_stage2_only_with_a_given_allocation(tiny, tmp_path):
    """--allocation: no stage 1; the weights train with the given (rule-based) mask and are exported with it."""
    from safetensors.torch import load_file

    from consa_vllm.allocation import make_allocation
    from consa_vllm.export import read_exported_allocation

    model, data = tiny
    given = make_allocation("bottom", 0.5, 2, 2, 24, "kv_head").with_extra(note="from a rule")
    given.save(tmp_path / "rule.json")
    # --window/--granularity/--target-sparsity given on the command line are replaced by the file's
    r = run("--model", model, "--data", data, "--seq-len", 64, "--batch-size", 2, "--lr", 1e-3,
            "--allocation", tmp_path / "rule.json", "--stage2-steps", 4, "--save-model", tmp_path / "trained",
            "--window", 7, "--target-sparsity", 0.9, "--out", tmp_path / "out.json", "--checkpoint-every", 0)
    assert r.returncode == 0, r.stderr
    assert "stage 2" in r.stderr and "stage 1" not in r.stderr
    out = Allocation.load(tmp_path / "out.json")
    assert (out.pattern, out.window, out.granularity) == (given.pattern, 24, "kv_head")
    t = out.model_extra["training"]
    assert t["stage1_steps"] == 0 and t["stage2_steps"] == 4 and t["allocation_file"] == str(tmp_path / "rule.json")
    assert "final_stage2" in t and t["final_stage2"]["loss"] > 0
    served = read_exported_allocation(tmp_path / "trained")
    assert served.pattern == given.pattern and served.window == 24
    hist = [json.loads(line) for line in (tmp_path / "out.logs" / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == [2, 2, 2, 2]
    before, after = load_file(model / "model.safetensors"), load_file(tmp_path / "trained" / "model.safetensors")
    moved = [k for k in before if k in after and not before[k].float().equal(after[k].float())]
    assert moved, "stage 2 did not change any weight"


@pytest.mark.parametrize("extra,message", [
    (["--save-model", "{tmp}/m"], "--allocation runs stage 2 only: give --stage2-steps N"),
    (["--stage2-steps", "2", "--save-model", "{tmp}/m", "--freeze-weights"], "--freeze-weights would leave nothing"),
    (["--stage2-steps", "2", "--save-model", "{tmp}/m", "--allocation", "{tmp}/three_layers.json"],
     "three_layers.json: pattern has 3 layers but the model has 2"),
    (["--stage2-steps", "2", "--save-model", "{tmp}/m", "--allocation", "{tmp}/missing.json"], "missing.json"),
])
def test_bad_fixed_allocation(tiny, tmp_path, extra, message):
    from consa_vllm.allocation import make_allocation

    model, data = tiny
    make_allocation("bottom", 0.5, 2, 2, 24, "kv_head").save(tmp_path / "ok.json")
    make_allocation("bottom", 0.5, 3, 2, 24, "kv_head").save(tmp_path / "three_layers.json")
    args = [a.format(tmp=tmp_path) for a in extra]
    if "--allocation" not in args:
        args += ["--allocation", str(tmp_path / "ok.json")]
    r = run("--model", model, "--data", data, "--out", tmp_path / "o" / "a.json", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("python -m consa_vllm.train: error: --allocation") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_bad_model_and_data_paths(tiny, tmp_path):
    model, data = tiny
    r = run("--model", tmp_path / "nope", "--data", data, "--out", tmp_path / "a.json")
    assert r.returncode == 2 and "--model" in r.stderr and "not a directory" in r.stderr
    r = run("--model", model, "--data", tmp_path / "missing.txt", "--out", tmp_path / "a.json")
    assert r.returncode == 2 and "--data" in r.stderr and "no such file" in r.stderr
    r = run("--model", model, "--data", data, "--choices-typo")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_data_fails_before_training(tiny, tmp_path):
    model, _ = tiny
    bad = tmp_path / "corpus"
    bad.mkdir()
    (bad / "a.txt").write_text("fine text " * 50)
    (bad / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff" * 20)
    r = run("--model", model, "--data", bad, "--out", tmp_path / "o" / "a.json", "--seq-len", 16, "--window", 8)
    assert r.returncode == 2, r.stderr
    assert "b.txt: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(tiny, tmp_path):
    """2 CPU ranks (gloo) x accum 1 == 1 process x accum 2: same data, same gate noise, same result."""
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not installed")
    model, data = tiny
    common = ["--model", model, "--data", data, "--seq-len", 64, "--window", 16, "--steps", 8, "--batch-size", 2,
              "--lr", 1e-3, "--checkpoint-every", 0, "--no-progress"]
    r1 = run(*common, "--grad-accum", 2, "--out", tmp_path / "one.json")
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
                         "--master-port", "29533", "-m", "consa_vllm.train", *map(str, common),
                         "--grad-accum", "1", "--out", str(tmp_path / "two.json")],
                        capture_output=True, text=True, timeout=240, env=ENV)
    assert r2.returncode == 0, r2.stderr
    a, b = Allocation.load(tmp_path / "one.json"), Allocation.load(tmp_path / "two.json")
    assert b.training["world_size"] == 2
    assert a.pattern == b.pattern
    la, lb = a.training["log_alpha"], b.training["log_alpha"]
    assert max(abs(x - y) for ra, rb in zip(la, lb) for x, y in zip(ra, rb)) < 1e-5
    assert abs(a.training["final"]["loss"] - b.training["final"]["loss"]) < 1e-5
