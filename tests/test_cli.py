"""The consa-vllm command line, run as a subprocess (CPU, no torch, no model loading)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from consa_vllm import cli

L, H = 4, 2


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "consa_vllm.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def assert_user_error(r: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err
    assert "\n" not in err, err
    assert err.startswith("consa-vllm"), err
    for p in phrases:
        assert p in err, (p, err)
    return err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\0")[-8:-4] == b"IEND"  # complete file
    return w, h


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A Qwen3-shaped checkpoint; the weight file is a placeholder (the CLI never loads weights)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": L,
        "num_attention_heads": 4, "num_key_value_heads": H, "head_dim": 32, "hidden_size": 128,
        "sliding_window": None, "use_sliding_window": False}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "tokenizer.json").write_text("{}")
    return d


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("show", "make", "export", "serve", "demo", "eval"):
        assert cmd in r.stdout


@pytest.mark.parametrize(
    "cmd, flags",
    [
        ("show", ["--png", "--model", "--context", "--dtype", "--block-size", "--json"]),
        ("make", ["--rule", "--sparsity", "--granularity", "--model", "--layers", "--kv-heads", "--window",
                  "--seed", "--out", "--png", "interleave", "uniform"]),
        ("export", ["--model", "--allocation", "--out", "--copy", "--link", "--force"]),
    ],
)
def test_subcommand_help(cmd, flags):
    r = run(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: consa-vllm {cmd}")
    for f in flags:
        assert f in r.stdout, f


def test_no_command_prints_help_and_fails():
    r = run()
    assert r.returncode == 2 and "COMMAND" in r.stderr


# ----------------------------------------------------------------------------- make / show


def test_make_then_show_with_png(tmp_path):
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    r = run("make", "--rule", "bottom", "--sparsity", "0.75", "--granularity", "kv_head", "--layers", 28,
            "--kv-heads", 8, "--window", 4096, "--out", out, "--png", png)
    assert r.returncode == 0, r.stderr
    a = json.loads(out.read_text())
    assert a["granularity"] == "kv_head" and a["window"] == 4096 and len(a["pattern"]) == 28
    assert sum(row.count("S") for row in a["pattern"]) == 168
    w, h = png_size(png)
    assert 400 <= w <= 4000 and 500 <= h <= 6000 and h > w  # tall: 28 layers x 8 heads

    png2 = tmp_path / "b.png"
    r = run("show", out, "--png", png2)
    assert r.returncode == 0, r.stderr
    assert "sparsity=0.7500" in r.stdout and "layer 27  FFFFFFFF  8F/0S" in r.stdout
    assert "all-S layers: 0-20" in r.stdout
    png_size(png2)


def test_make_from_model_dir_and_kv_estimate(tmp_path, model_dir):
    out = tmp_path / "a.json"
    r = run("make", "--rule", "middle", "--sparsity", "0.5", "--model", model_dir, "--window", 64, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["pattern"] == ["SS", "FF", "FF", "SS"]

    r = run("show", out, "--model", model_dir, "--context", 1000, 10, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "KV cache per sequence" in r.stdout
    # 4 F + 4 S heads, 128 B per token per head: 128*(4*1000+4*64) = 544768 B = 532.00 KiB vs 1000 KiB.
    assert "532.00 KiB" in r.stdout and "0.532" in r.stdout

    r = run("show", out, "--model", model_dir, "--context", 1000, "--dtype", "bf16", "--block-size", 32, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    row = data["kv_estimate"]["per_context"][0]
    assert row == {"context": 1000, "bytes_per_sequence": 128 * (4 * 1024 + 4 * 96),
                   "dense_bytes_per_sequence": 128 * 8 * 1024, "ratio_to_dense": 0.546875}
    assert data["summary"]["sparsity"] == 0.5


def test_make_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "a.json"
    args = ["make", "--rule", "top", "--sparsity", "0.5", "--layers", 4, "--kv-heads", 2, "--window", 8, "--out", out]
    assert run(*args).returncode == 0
    assert_user_error(run(*args), "--out", "already exists", "--force")
    assert run(*args, "--force").returncode == 0


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--sparsity", "1.5"], ["--sparsity", "must be in [0, 1]"]),
        (["--sparsity", "abc"], ["--sparsity", "expected a number"]),
        (["--sparsity", "0.3"], ["--sparsity", "cannot be met exactly", "0.25 or 0.375"]),
        (["--window", "0"], ["--window", "must be >= 1"]),
        (["--window", "4k"], ["--window", "expected a whole number"]),
        (["--layers", "0"], ["--layers", "must be >= 1"]),
        (["--rule", "sideways"], ["--rule", "invalid choice"]),
        (["--granularity", "layer", "--rule", "uniform"], ["--rule", "uniform", "kv_head"]),
        (["--kv-heads", None], ["--kv-heads is required without --model"]),
        (["--out", None], ["--out"]),
    ],
)
def test_make_bad_values(tmp_path, args, phrases):
    base = {"--rule": "bottom", "--sparsity": "0.5", "--layers": "4", "--kv-heads": "2", "--window": "8",
            "--out": str(tmp_path / "a.json")}
    it = iter(args)
    for flag, value in zip(it, it):
        base[flag] = value
    argv = [x for k, v in base.items() if v is not None for x in (k, v)]
    assert_user_error(run("make", *argv), *phrases)
    assert not (tmp_path / "a.json").exists()


def test_make_model_and_layers_conflict(tmp_path, model_dir):
    assert_user_error(run("make", "--rule", "bottom", "--sparsity", "0.5", "--model", model_dir, "--layers", 4,
                          "--window", 8, "--out", tmp_path / "a.json"), "either --model DIR or --layers")
    assert_user_error(run("make", "--rule", "bottom", "--sparsity", "0.5", "--model", tmp_path / "nope",
                          "--window", 8, "--out", tmp_path / "a.json"), "--model", "config.json: not found")


def test_show_bad_inputs(tmp_path, model_dir):
    assert_user_error(run("show", tmp_path / "missing.json"), "missing.json: allocation file not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert_user_error(run("show", tmp_path / "bad.json"), "bad.json: not valid JSON")
    (tmp_path / "x.json").write_text(json.dumps({"granularity": "kv_head", "window": 8, "pattern": ["SQ"]}))
    assert_user_error(run("show", tmp_path / "x.json"), "x.json", "field 'pattern'", "'Q'")
    (tmp_path / "six.json").write_text(json.dumps({"granularity": "kv_head", "window": 8, "pattern": ["SS"] * 6}))
    err = assert_user_error(run("show", tmp_path / "six.json", "--model", model_dir),
                            "six.json", "6 layers but the model has 4 (num_hidden_layers)")
    assert "config.json" in err
    assert_user_error(run("show", tmp_path / "six.json", "--context", 100), "--context needs --model")
    assert_user_error(run("show", tmp_path / "six.json", "--dtype", "int3"), "--dtype", "unknown KV dtype")


def test_show_tensor_parallel_split(tmp_path):
    """``show --tensor-parallel-size N``: the plugin's own layout per rank (pools, heads used,
    its balancing note), with more ranks than KV heads too; a size vLLM cannot shard is one line."""
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"granularity": "kv_head", "window": 256, "pattern": ["FSSS", "SSSS", "SFFS", "FFFF"]}))
    r = run("show", a, "--tensor-parallel-size", 8, "--json")
    assert r.returncode == 0, r.stderr
    tp = json.loads(r.stdout)["tensor_parallel"]
    # 4 KV heads on 8 ranks: each head on 2 adjacent ranks, balanced over the 4 heads (7 F: 2+2+2+1).
    assert (tp["kv_shards"], tp["kv_heads_per_rank"], tp["full_pool_heads"], tp["sliding_pool_heads"]) == (4, 1, 2, 3)
    used = [(x["full_used"], x["sliding_used"]) for x in tp["ranks"]]
    assert used[0::2] == used[1::2], "replicas of a head serve the same heads"
    assert sorted(used[0::2]) == [(1, 3), (2, 2), (2, 2), (2, 2)]
    assert "the 4 KV-head shards (vLLM replicates each KV head on 2 ranks)" in tp["note"]
    r = run("show", a, "--tensor-parallel-size", 2)
    assert r.returncode == 0, r.stderr
    assert "tensor parallelism (2 ranks): 2 KV head(s) per layer per rank; every rank's pools: 4 F + 5 S" in r.stdout
    assert "rank   0: 4 F + 4 S heads used" in r.stdout and "rank   1: 3 F + 5 S heads used" in r.stdout
    assert_user_error(run("show", a, "--tensor-parallel-size", 3), "--tensor-parallel-size 3",
                      "4 KV heads per layer can be neither split evenly across nor replicated evenly over")
    assert_user_error(run("show", a, "--tensor-parallel-size", 0), "--tensor-parallel-size", "must be >= 1")
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"granularity": "layer", "window": 256, "pattern": ["F", "S", "S", "F"]}))
    r = run("show", layer, "--tensor-parallel-size", 8)
    assert r.returncode == 0, r.stderr
    assert "stock vLLM attention per layer" in r.stdout


# ----------------------------------------------------------------------------- export


def test_export_and_show_exported(tmp_path, model_dir):
    a = tmp_path / "a.json"
    assert run("make", "--rule", "bottom", "--sparsity", "0.5", "--model", model_dir, "--window", 16,
               "--out", a).returncode == 0
    dst = tmp_path / "dst"
    r = run("export", "--model", model_dir, "--allocation", a, "--out", dst)
    assert r.returncode == 0, r.stderr
    assert "ConsaQwen3ForCausalLM" in r.stdout
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["ConsaQwen3ForCausalLM"]
    assert cfg["consa"]["pattern"] == ["SS", "SS", "FF", "FF"]
    assert os.path.samefile(model_dir / "model.safetensors", dst / "model.safetensors")
    assert (dst / "tokenizer.json").is_file()

    # show reads an exported checkpoint directly, with its own shape for the estimate.
    r = run("show", dst, "--context", 64, 1024)
    assert r.returncode == 0, r.stderr
    assert "base_architecture" in r.stdout and "KV cache per sequence" in r.stdout

    # Existing DST: refused, then --force --copy replaces it with copied weights.
    assert_user_error(run("export", "--model", model_dir, "--allocation", a, "--out", dst),
                      "already exists", "--force")
    r = run("export", "--model", model_dir, "--allocation", a, "--out", dst, "--force", "--copy")
    assert r.returncode == 0, r.stderr
    assert not os.path.samefile(model_dir / "model.safetensors", dst / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dst", "model"]


def test_export_bad_inputs(tmp_path, model_dir):
    six = tmp_path / "six.json"
    six.write_text(json.dumps({"granularity": "kv_head", "window": 8, "pattern": ["SS"] * 6}))
    dst = tmp_path / "dst"
    assert_user_error(run("export", "--model", model_dir, "--allocation", six, "--out", dst),
                      "six.json", "num_hidden_layers")
    assert_user_error(run("export", "--model", tmp_path / "nope", "--allocation", six, "--out", dst),
                      "source model directory not found")
    assert_user_error(run("export", "--model", model_dir, "--allocation", tmp_path / "none.json", "--out", dst),
                      "none.json: allocation file not found")
    assert_user_error(run("export", "--model", model_dir, "--allocation", six, "--out", dst, "--copy", "--link"),
                      "--link", "not allowed with argument --copy")
    assert_user_error(run("export", "--model", model_dir, "--out", dst), "--allocation")
    assert not dst.exists()


# ----------------------------------------------------------------------------- delegated commands


def test_delegated_commands_receive_raw_argv(monkeypatch):
    seen = {}
    fake = types.ModuleType("consa_vllm._fake_serve")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "consa_vllm._fake_serve", fake)
    monkeypatch.setitem(cli.DELEGATED, "serve", ("consa_vllm._fake_serve", "main", "serve"))
    assert cli.main(["serve", "--help", "./model", "--port", "8001"]) == 0
    assert seen["argv"] == ["--help", "./model", "--port", "8001"]


def test_delegated_command_with_a_missing_module_is_a_bug_not_a_user_error(monkeypatch, capsys):
    # Every delegated command ships with the package: a missing module is a broken install,
    # reported with its traceback rather than as a one-line usage error.
    monkeypatch.setitem(cli.DELEGATED, "eval", ("consa_vllm._no_such_module", "main", "eval"))
    with pytest.raises(ModuleNotFoundError, match="consa_vllm._no_such_module"):
        cli.main(["eval", "x"])
    assert capsys.readouterr().err == ""


def test_delegated_commands_point_at_their_modules():
    assert cli.DELEGATED["serve"][:2] == ("consa_vllm.serve", "main")
    assert cli.DELEGATED["demo"][:2] == ("consa_vllm.demo", "main")
    assert cli.DELEGATED["eval"][:2] == ("consa_vllm.eval.cli", "main")


def test_console_script_installed():
    script = Path(sys.executable).parent / "consa-vllm"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("consa-vllm ")
