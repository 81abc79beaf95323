"""Bad input to ``consa-vllm serve`` and to the plain vLLM server: fail fast, one clear message.

- ``consa-vllm serve`` checks the checkpoint before anything heavy: exit status 2, one line
  on stderr naming config.json and the field, no torch/vLLM import, well within seconds.
- The plain ``python -m vllm.entrypoints.openai.api_server`` loads the ``consa`` plugin from
  its entry point, and the plugin's config hook (consa_vllm/plugin/config.py) stops it
  before any weight is read, with the same message.
- A window >= max_model_len is accepted, with a warning (config hook only, no engine).
- The wrapper's command line: the exec'd command, VLLM_CPU_KVCACHE_SPACE defaulting,
  VLLM_PLUGINS kept when set (all plugins + consa_endpoint when unset), and --help (os.execve is replaced, nothing is started).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consa_vllm import serve

WINDOW = 24
PATTERN = ["FFSS", "SSSS", "FSSS", "FFFS"]
FAST_S = 20  # "a few seconds" on a loaded 2-core CI machine; measured ~0.5 s
API_SERVER = "vllm.entrypoints.openai.api_server"


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model) -> Path:
    """A real exported tiny Qwen3 (4 layers x 4 KV heads) that vLLM could serve."""
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    root = tmp_path_factory.mktemp("serve-errors")
    src = tiny_model("qwen3", num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32)
    return export_model(src, Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN),
                        root / "good", force=True)


def variant(good: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of ``good`` whose config.json is changed by ``edit(config_dict)``."""
    d = tmp_path / name
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def bad_char(cfg):
    cfg["consa"]["pattern"][1] = "SSXS"


def three_layers(cfg):
    cfg["consa"]["pattern"] = PATTERN[:3]


def five_heads(cfg):
    cfg["consa"]["pattern"] = [r + "F" for r in PATTERN]


def no_consa(cfg):
    del cfg["consa"]


def plain_arch(cfg):
    cfg["architectures"] = ["Qwen3ForCausalLM"]


def run_serve(*args, env=None, timeout=60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "consa_vllm.cli", "serve", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    return r, time.monotonic() - t0


def assert_one_line_error(r: subprocess.CompletedProcess, elapsed: float, *phrases: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert "\n" not in err, err
    assert err.startswith("consa-vllm serve: error: "), err
    for p in phrases:
        assert p in err, (p, err)
    assert r.stdout == ""
    assert elapsed < FAST_S, elapsed
    return err


# ----------------------------------------------------------------------------- consa-vllm serve


@pytest.mark.parametrize("name, edit, phrases", [
    ("bad-char", bad_char, ["config.json", "field 'consa'", "'pattern'", "layer 1", "'X'"]),
    ("three-layers", three_layers, ["config.json", "field 'consa.pattern'", "3 layers", "has 4",
                                    "num_hidden_layers"]),
    ("five-heads", five_heads, ["config.json", "field 'consa.pattern'", "5 KV heads per layer", "has 4",
                                "num_key_value_heads"]),
    ("no-consa", no_consa, ["config.json", "field 'consa' is missing", "consa-vllm export"]),
    ("plain-arch", plain_arch, ["config.json", "field 'architectures'", "'ConsaQwen3ForCausalLM'"]),
])
def test_serve_rejects_bad_checkpoint(good, tmp_path, name, edit, phrases):
    d = variant(good, tmp_path, name, edit)
    r, elapsed = run_serve(d, "--port", "1", "--max-model-len", "512")
    err = assert_one_line_error(r, elapsed, str(d / "config.json"), *phrases)
    assert "exec" not in err


def test_serve_missing_directory(tmp_path):
    d = tmp_path / "does-not-exist"
    r, elapsed = run_serve(d)
    assert_one_line_error(r, elapsed, str(d / "config.json"), "not found", "does not exist")


def test_serve_directory_without_config(tmp_path):
    r, elapsed = run_serve(tmp_path, "--port", "8000")
    assert_one_line_error(r, elapsed, str(tmp_path / "config.json"), "not found")


def test_server_process_reports_an_early_exit_with_the_server_log(tmp_path):
    """The package's server manager (demo, HTTP tests): a server that stops before /health
    answers is reported at once, its log kept, nothing left running."""
    from consa_vllm.server_process import ServerError, ServerProcess, free_port

    d = tmp_path / "does-not-exist"
    server = ServerProcess(d, free_port(), tmp_path / "server.log", args=("--max-model-len", "512"))
    server.start()
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="exited with status 2 before /health answered"):
        server.wait_healthy(timeout=FAST_S)
    assert time.monotonic() - t0 < FAST_S
    assert f"consa-vllm serve: error: {d / 'config.json'}" in server.read_log()
    server.stop()
    assert server.proc.returncode == 2


def test_serve_usage_errors(good):
    r, elapsed = run_serve("--port", "8000")
    assert_one_line_error(r, elapsed, "missing MODEL_DIR")
    r, elapsed = run_serve(good, "--model", good)
    assert_one_line_error(r, elapsed, "MODEL_DIR given twice")


def test_serve_error_imports_nothing_heavy(good, tmp_path):
    """The checks run on config.json alone: no torch, transformers or vLLM import."""
    d = variant(good, tmp_path, "bad", bad_char)
    code = ("import sys, json; from consa_vllm import cli; rc = cli.main(['serve', sys.argv[1]]); "
            "print(json.dumps([m for m in ('torch', 'transformers', 'vllm', 'safetensors') if m in sys.modules])); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout) == []


# ----------------------------------------------------------------------------- plain vLLM server


@pytest.mark.engine  # starts vLLM's API server (which must stop before its engine starts)
@pytest.mark.parametrize("plugins", [None, "consa"], ids=["entry-point", "VLLM_PLUGINS=consa"])
def test_plain_vllm_server_stops_before_loading_weights(good, tmp_path, plugins):
    pytest.importorskip("vllm")
    d = variant(good, tmp_path, "bad", bad_char)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", **({"VLLM_PLUGINS": plugins} if plugins else {}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", API_SERVER, "--model", str(d), "--port", "1",
                        "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"],
                       capture_output=True, text=True, timeout=180, env=env)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-5000:]
    assert "Loading weights" not in out and "Loading safetensors" not in out, out[-5000:]
    assert "EngineCore" not in out, "an engine process started"
    msg = (f"{d / 'config.json'} (field 'consa'): invalid allocation: field 'pattern': layer 1 ('SSXS') "
           "has invalid character(s) 'X'")
    assert msg in out, out[-5000:]
    assert elapsed < 120, elapsed


# ----------------------------------------------------------------------------- window >= max_model_len


@pytest.mark.slow  # three vLLM engine configurations in a subprocess (no engine starts)
def test_window_at_least_max_model_len_is_accepted_with_a_warning(good, tmp_path):
    """Through the plugin's config hook (EngineArgs.create_engine_config), no engine started."""
    pytest.importorskip("vllm")
    big = variant(good, tmp_path, "big-window", lambda c: c["consa"].update(window=1024))
    code = r"""
import sys
from vllm.engine.arg_utils import EngineArgs
for model, n in ((sys.argv[1], 512), (sys.argv[1], 1024), (sys.argv[2], 512)):
    cfg = EngineArgs(model=model, max_model_len=n, dtype="float32", enforce_eager=True).create_engine_config()
    assert cfg.cache_config.sliding_window is None, cfg.cache_config.sliding_window
    print(f"CONFIG-OK {model} {cfg.model_config.max_model_len}", flush=True)
    print(f"END {n}", flush=True)
"""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(big), str(good)], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stdout.count("CONFIG-OK") == 3, r.stdout
    warning = "window 1024 >= max_model_len {n}, so the sliding-window (S) heads see the whole context " \
              "and act as full attention"
    # One warning per config of the big-window model; none for the window-24 model. The
    # plugin logs through vLLM's logger, whose handler writes to stdout.
    out = r.stdout
    first, rest = out.split("END 512", 1)
    second, third = rest.split("END 1024", 1)
    assert warning.format(n=512) in first, out[-5000:]
    assert warning.format(n=1024) in second, out[-5000:]
    assert "act as full attention" not in third + r.stderr, out[-5000:]
    assert "Error" not in out + r.stderr, (out + r.stderr)[-5000:]


# ----------------------------------------------------------------------------- the wrapper itself


class Execed(Exception):
    pass


@pytest.fixture
def fake_exec(monkeypatch):
    seen = {}

    def execve(path, argv, env):
        seen.update(path=path, argv=list(argv), env=dict(env))
        raise Execed

    monkeypatch.setattr(serve.os, "execve", execve)
    return seen


def test_wrapper_execs_the_api_server(good, fake_exec, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    with pytest.raises(Execed):
        serve.main([str(good), "--port", "8123", "--dtype", "float32", "--max-model-len", "512"])
    assert fake_exec["path"] == sys.executable
    assert fake_exec["argv"] == [sys.executable, "-m", API_SERVER, "--model", str(good),
                                 "--port", "8123", "--dtype", "float32", "--max-model-len", "512"]
    assert fake_exec["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2"  # the user's value wins
    # Unset VLLM_PLUGINS: every installed plugin still loads, plus the consa_endpoint routes.
    assert fake_exec["env"]["VLLM_PLUGINS"] == serve.default_vllm_plugins()
    assert {"consa", "consa_endpoint"} <= set(fake_exec["env"]["VLLM_PLUGINS"].split(","))
    err = capsys.readouterr().err
    assert "defaulting" not in err and f"-m {API_SERVER} --model" in err


def test_wrapper_accepts_model_flag(good, fake_exec, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "consa")
    with pytest.raises(Execed):
        serve.main(["--port", "8123", f"--model={good}", "--enforce-eager"])
    assert fake_exec["argv"][3:] == ["--model", str(good), "--port", "8123", "--enforce-eager"]
    assert fake_exec["env"]["VLLM_PLUGINS"] == "consa"


def test_wrapper_defaults_cpu_kv_cache_space(good, fake_exec, monkeypatch, capsys):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(serve, "cuda_available", lambda: False)
    with pytest.raises(Execed):
        serve.main([str(good)])
    assert fake_exec["env"]["VLLM_CPU_KVCACHE_SPACE"] == serve.DEFAULT_CPU_KVCACHE_GIB
    assert f"VLLM_CPU_KVCACHE_SPACE was unset, defaulting to {serve.DEFAULT_CPU_KVCACHE_GIB}" \
        in capsys.readouterr().err
    # With CUDA, nothing is defaulted.
    monkeypatch.setattr(serve, "cuda_available", lambda: True)
    with pytest.raises(Execed):
        serve.main([str(good)])
    assert "VLLM_CPU_KVCACHE_SPACE" not in fake_exec["env"]


def test_wrapper_warns_when_vllm_plugins_excludes_consa(good, fake_exec, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    with pytest.raises(Execed):
        serve.main([str(good)])
    assert fake_exec["env"]["VLLM_PLUGINS"] == "other"  # left as set
    assert "VLLM_PLUGINS='other' does not include 'consa'" in capsys.readouterr().err


def test_serve_help():
    r, elapsed = run_serve("--help")
    assert r.returncode == 0, r.stderr
    h = r.stdout
    for phrase in ("MODEL_DIR", "vllm serve MODEL_DIR", f"python -m {API_SERVER}", "--model MODEL_DIR",
                   "VLLM_PLUGINS=consa", "entry point", "no --plugin flag", "VLLM_CPU_KVCACHE_SPACE",
                   "exits with status 2"):
        assert phrase in " ".join(h.split()), phrase
