"""The H100 testbed (``benchmarks/testbed``) end to end at toy size on CPU (``--smoke``, ~45-80 s).

Checks the pipeline, not the science (the toy model learns nothing in 12 steps; the CPU
evidence is tests/test_evidence_cpu.py): every phase runs, the outputs are complete and
well-formed, the corpus manifest matches the files, reruns skip finished work, and a run
directory with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.testbed.run import CONSA_VARIANTS, RULES, SMOKE, RunResults

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.testbed.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed") / "run"
    pub = out.parent / "published"
    r = _run("--out", str(out), "--smoke", "--results-dir", str(pub))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, pub


@pytest.mark.slow
def test_every_allocation_is_trained_evaluated_and_reported(run_dir):
    out, pub = run_dir
    res = RunResults.model_validate_json((out / "results.json").read_text())
    names = {r.name for r in res.rows}
    want = {"dense"} | {f"{v}-{rho}" for v in CONSA_VARIANTS for rho in SMOKE.rhos} | \
        {f"rule-{r}-{rho}" for r in RULES for rho in SMOKE.rhos}
    assert names == want
    for r in res.rows:
        assert (out / "stage2" / r.name / "config.json").is_file()
        assert (out / "heatmaps" / f"{r.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert r.rho == (0.0 if r.name == "dense" else float(r.name.rsplit("-", 1)[1]))
        # Equal rho, equal KV memory: the estimator's ratio depends on rho only (one window).
        same = [x.kv_ratio_to_dense for x in res.rows if x.rho == r.rho]
        assert len(set(same)) == 1
        exported = json.loads((out / "stage2" / r.name / "config.json").read_text())["consa"]
        assert exported["pattern"] == r.pattern
    layer = [r for r in res.rows if r.name.startswith("consa-layer")]
    assert all(set(row) in ({"F"}, {"S"}) for r in layer for row in r.pattern)
    table = [line for line in (pub / "results.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == len(res.rows) + 2
    # every phase timed, summed over reruns (the H100 figure for "pretrain within 10 minutes")
    assert set(res.phase_seconds) == {"corpus", "pretrain", "allocations", "stage2", "eval"}
    assert res.phase_seconds["pretrain"] > 0 and res.device.startswith("cpu")
    assert sorted(p.name for p in (pub / "heatmaps").iterdir()) == sorted(f"{n}.png" for n in names)


@pytest.mark.slow
def test_corpus_manifest_records_the_files_and_their_hashes(run_dir):
    out, _ = run_dir
    m = json.loads((out / "corpus" / "manifest.json").read_text())
    assert m["files"] and {f["split"] for f in m["files"]} == {"train", "heldout"}
    for f in m["files"][:20]:
        assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"]
    n_train = sum(1 for _ in open(out / "corpus" / "train.jsonl"))
    assert n_train == sum(f["split"] == "train" for f in m["files"])


@pytest.mark.slow
def test_rerun_skips_finished_work_and_other_settings_are_refused(run_dir):
    out, _ = run_dir
    before = (out / "stage2" / "dense" / "config.json").stat().st_mtime_ns
    r = _run("--out", str(out), "--smoke", "--phase", "stage2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "stage2" / "dense" / "config.json").stat().st_mtime_ns == before
    r = _run("--out", str(out), "--phase", "corpus", "--device", "cpu")  # full sizes into a smoke run
    assert r.returncode == 2 and "other settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_lm_training_resumes_from_a_safetensors_checkpoint_to_the_same_weights(tmp_path):
    """``train_lm`` stopped by its time budget and called again ends where one uninterrupted run
    ends; the state in between is safetensors + JSON (no pickle), and it is removed at the end."""
    import torch

    from benchmarks.testbed.lm import build_model, train_lm

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=64)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        return ids, ids == 7

    kw = dict(warmup=2, answer_weight=1.0, log_every=1)
    straight = build_model(shape, seed=0)
    assert train_lm(straight, batch, 6, 1e-2, **kw)["done"]

    resumed = build_model(shape, seed=0)
    ckpt = tmp_path / "state"
    first = train_lm(resumed, batch, 6, 1e-2, ckpt_dir=ckpt, max_seconds=0.0, **kw)
    assert first == {"done": False, "step": 1, "last_loss": first["last_loss"], "skipped": 0}
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert files == ["latest", "step_00000001/state.json", "step_00000001/tensors.safetensors"]
    fresh = build_model(shape, seed=1)  # other weights: everything must come from the checkpoint
    second = train_lm(fresh, batch, 6, 1e-2, ckpt_dir=ckpt, **kw)
    assert second["done"] and second["step"] == 6 and not ckpt.exists()
    want, got = straight.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_lm_training_skips_a_step_whose_loss_is_not_finite():
    """A batch whose loss is not finite is skipped: that step changes no weight, the log says so,
    and the steps around it train as usual (finite weights, finite losses)."""
    import torch

    from benchmarks.testbed.lm import build_model, train_lm

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    bad_step = 2
    model = build_model(shape, seed=0)
    emb = model.model.embed_tokens.weight
    seen: dict = {}

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            if step == bad_step:  # an inf embedding row used by this batch: the loss is not finite
                seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                seen["row"] = int(ids[0, 0])
                emb[seen["row"]] = float("inf")
            elif step == bad_step + 1:  # undo the poison, then compare with the state before the bad step
                emb[seen["row"]] = seen["state"]["model.embed_tokens.weight"][seen["row"]]
                now = model.state_dict()
                seen["unchanged"] = all(torch.equal(now[k], v) for k, v in seen["state"].items())
        return ids, ids == 7

    logs: list[dict] = []
    res = train_lm(model, batch_fn, 5, 1e-2, warmup=1, log_every=1, log=logs.append)
    assert res["done"] and res["step"] == 5 and res["skipped"] == 1
    assert seen["unchanged"], "the skipped step changed the weights"
    assert [r["step"] for r in logs if "skipped" in r] == [bad_step + 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [r["loss"] for r in logs if "skipped" not in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
