"""The H100 stage-1 bench (``benchmarks/bench_train_stage1.py``) at toy size on CPU: it runs and its JSON is sound."""

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_stage1.py")


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "res" / "stage1.json"
    r = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--smoke",
                        "--json", str(out), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["smoke"] is True and d["seq_len"] == 256 and d["granularity"] == "kv_head"
    assert [x["mode"] for x in d["results"]] == ["masks", "joint"]
    for x in d["results"]:
        assert x["steps"] == 4 and x["tokens_per_s"] > 0 and x["peak_gpu_mem_gib"] is None
        assert abs(x["tokens_per_s"] * x["step_time_s_median"] - 256) < 1e-6
        assert x["projected_minutes_to_allocation_4M_tokens"] > x["projected_minutes_for_4M_tokens"]
        assert x["under_10_minutes"] == (x["projected_minutes_to_allocation_4M_tokens"] < 10)
    # the runs were real trainer runs: allocations of the toy shape were written
    for mode in ("masks", "joint"):
        a = json.loads((tmp_path / "work" / f"{mode}.json").read_text())
        assert len(a["pattern"]) == 2 and all(row.count("S") == 1 for row in a["pattern"])


def test_bench_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "--json", str(tmp_path / "x.json"),
                        "--modes", "masks,fast"], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and "--modes: expected masks and/or joint, got 'masks,fast'" in r.stderr
    assert not (tmp_path / "x.json").exists()
