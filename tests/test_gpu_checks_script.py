"""``benchmarks/gpu_checks.sh``, the GPU machine's one-call test runner, on CPU with ``python``
faked: case selection, ``REPEAT``, ``HASHSEEDS`` and ``PROMPT_SEEDS`` (one process per seed,
``PYTHONHASHSEED`` or ``CONSA_GPU_PROMPT_SEED`` set,
tags and report folders per repeat), the one-line refusals, and the archive it leaves in $OUT."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checks(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"  # stands for `python -m pytest ...`: says what it was given
    fake.write_text('#!/bin/sh\necho "seed=${PYTHONHASHSEED:-unset} prompts=${CONSA_GPU_PROMPT_SEED:-unset} '
                    'report=$CONSA_GPU_REPORT_DIR args=$* port=${VLLM_PORT:-unset}"\n')
    fake.chmod(stat.S_IRWXU)
    # stdout to a file: the script's watchdog may hold a pipe until DEADLINE
    log = tmp_path / "stdout.txt"
    with log.open("w") as f:
        r = subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=ROOT, stdout=f, stderr=subprocess.PIPE,
                           text=True, timeout=120,
                           env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DEADLINE": "5", **env})
    r.stdout = log.read_text()
    return r


def _logs(out: Path) -> dict[str, str]:
    """Each case's log in the archive the script left in ``out``, by file name."""
    with tarfile.open(out / "gpu-checks.tgz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers()
                if m.name.endswith(".log")}


def test_hashseeds_run_one_process_per_seed(tmp_path):
    out = tmp_path / "out"
    r = _checks(tmp_path, OUT=str(out), ONLY="ops", HASHSEEDS="7 9 7")
    assert r.returncode == 0, r.stderr
    logs = _logs(out)
    assert sorted(logs) == ["ops.r1.h7.log", "ops.r2.h9.log", "ops.r3.h7.log"]
    for k, seed in ((1, 7), (2, 9), (3, 7)):
        line = logs[f"ops.r{k}.h{seed}.log"]
        assert line.startswith(f"seed={seed} prompts=unset report={out}/r{k} args=-m pytest")
        assert "tests/test_gpu_ops.py" in line
    # without HASHSEEDS the hash seed is left to Python, and ONLY picks the case
    out2 = tmp_path / "out2"
    r = _checks(tmp_path, OUT=str(out2), ONLY="ops", REPEAT="2")
    logs = _logs(out2)
    assert sorted(logs) == ["ops.r1.log", "ops.r2.log"] and logs["ops.r1.log"].startswith("seed=unset prompts=unset ")


def test_each_process_takes_ports_from_its_own_range(tmp_path):
    # Engines of parallel processes drew the same port when the kernel picked them (run 27).
    out = tmp_path / "out"
    r = _checks(tmp_path, OUT=str(out), ONLY="ops schedule engine-greedy", REPEAT="2")
    assert r.returncode == 0, r.stderr
    ports = [int(line.rsplit("port=", 1)[1]) for line in _logs(out).values()]
    assert len(ports) == 8 and len(set(ports)) == 8
    assert all(abs(a - b) >= 200 for i, a in enumerate(ports) for b in ports[i + 1:])
    # Several scripts at once (gpu_checkpoint_groups.sh, or a draw beside a run) each start at a
    # PORT_BASE of their own.
    out2 = tmp_path / "out2"
    r = _checks(tmp_path, OUT=str(out2), ONLY="ops schedule", PORT_BASE="30000")
    assert r.returncode == 0, r.stderr
    assert sorted(int(line.rsplit("port=", 1)[1]) for line in _logs(out2).values()) == [30200, 30400]


def test_prompt_seeds_run_one_process_per_seed(tmp_path):
    out = tmp_path / "out"
    r = _checks(tmp_path, OUT=str(out), ONLY="checkpoint", PROMPT_SEEDS="0 3")
    assert r.returncode == 0, r.stderr
    logs = _logs(out)
    assert sorted(logs) == ["checkpoint.r1.p0.log", "checkpoint.r2.p3.log"]
    for k, seed in ((1, 0), (2, 3)):
        line = logs[f"checkpoint.r{k}.p{seed}.log"]
        assert line.startswith(f"seed=unset prompts={seed} report={out}/r{k} args=-m pytest")
        assert "tests/test_gpu_checkpoint.py" in line


def test_bad_repeat_and_hashseeds_are_refused_in_one_line(tmp_path):
    for env, msg in ((dict(HASHSEEDS="1 x"), "gpu_checks: HASHSEEDS must be whole numbers, got 'x'"),
                     (dict(HASHSEEDS="1 2", REPEAT="2"), "gpu_checks: set one of REPEAT, HASHSEEDS and PROMPT_SEEDS"),
                     (dict(PROMPT_SEEDS="1 2", HASHSEEDS="3"),
                      "gpu_checks: set one of REPEAT, HASHSEEDS and PROMPT_SEEDS"),
                     (dict(PROMPT_SEEDS="-1"), "gpu_checks: PROMPT_SEEDS must be whole numbers, got '-1'"),
                     (dict(REPEAT="0"), "gpu_checks: REPEAT must be a positive integer, got '0'"),
                     (dict(PORT_BASE="20k"), "gpu_checks: PORT_BASE must be a port number, got '20k'")):
        out = tmp_path / "never"
        r = _checks(tmp_path, OUT=str(out), **env)
        assert r.returncode == 2 and r.stderr.strip() == msg
        assert not out.exists()  # refused before anything starts


def test_every_mixtral_variant_has_a_case(tmp_path):
    """Each diagnostic variant of the same-model test (tests/test_gpu_families.py) can be run by
    name through the script, so a new one is not left out of the GPU machine's runs."""
    from test_gpu_families import ALL_F_VARIANTS, LAYER_SHAPED_VARIANTS

    out = tmp_path / "out"
    r = _checks(tmp_path, OUT=str(out), ONLY="same-model-mixtral")
    assert r.returncode == 0, r.stderr
    with tarfile.open(out / "gpu-checks.tgz") as tar:
        logs = {Path(m.name).name[:-len(".log")]: tar.extractfile(m).read().decode() for m in tar.getmembers()
                if m.name.endswith(".log")}
    variants = [*ALL_F_VARIANTS, *LAYER_SHAPED_VARIANTS]
    assert sorted(logs) == sorted(f"same-model-mixtral-{v}" for v in variants)
    for v in variants:
        assert f"test_gpu_same_model_parity[mixtral-{v}]" in logs[f"same-model-mixtral-{v}"]


def test_the_draws_of_the_two_max_misses_run_only_when_named(tmp_path):
    """``quant-sharp-misses`` (run 27's two formats whose max missed) is a diagnostic: not in a
    full run, and with PROMPT_SEEDS one process per draw, both formats in each."""
    out = tmp_path / "out"
    r = _checks(tmp_path, OUT=str(out), ONLY="quant-sharp-misses=", PROMPT_SEEDS="1 2")
    assert r.returncode == 0, r.stderr
    logs = _logs(out)
    assert sorted(logs) == ["quant-sharp-misses.r1.p1.log", "quant-sharp-misses.r2.p2.log"]
    for line in logs.values():
        assert "_sharp_attention[ct-fp8-block]" in line and "_sharp_attention[ct-w4a16-asym]" in line
    everything = tmp_path / "all"
    r = _checks(tmp_path, OUT=str(everything))
    assert r.returncode == 0, r.stderr
    names = _logs(everything)
    assert "quant-sharp-2.log" in names and not any(n.startswith("quant-sharp-misses") for n in names)
    assert not any(n.startswith("quant-sharp-asym") for n in names)
    # the W4A16 asym format alone, when named: one process per draw, that format only
    asym = tmp_path / "asym"
    r = _checks(tmp_path, OUT=str(asym), ONLY="quant-sharp-asym=", PROMPT_SEEDS="3")
    assert r.returncode == 0, r.stderr
    logs = _logs(asym)
    assert sorted(logs) == ["quant-sharp-asym.p3.log"]
    line = logs["quant-sharp-asym.p3.log"]
    assert line.startswith("seed=unset prompts=3 ") and "_sharp_attention[ct-w4a16-asym]" in line
    assert "ct-fp8-block" not in line


def test_a_draw_gives_the_calibrated_tests_other_prompts():
    """``CONSA_GPU_PROMPT_SEED`` as the GPU tests read it (``gpu_parity``): draw 0 keeps each test's
    own prompts (the committed runs'), another draw other prompts, a bad value one line."""
    code = ("import gpu_parity, engine_harness; "
            "print(gpu_parity.prompt_draw(11), engine_harness.prompts_of([5], seed=gpu_parity.prompt_draw(11)))")

    def run(seed: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CONSA_GPU_PROMPT_SEED": seed})

    from engine_harness import prompts_of

    first, second = run("0"), run("2")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split(" ", 1) == ["11", f"{prompts_of([5], seed=11)}\n"]
    assert second.stdout.split(" ", 1) == ["2011", f"{prompts_of([5], seed=2011)}\n"]
    assert first.stdout.split(" ", 1)[1] != second.stdout.split(" ", 1)[1]
    bad = run("two")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "ValueError: CONSA_GPU_PROMPT_SEED must be a whole number, got 'two'")
