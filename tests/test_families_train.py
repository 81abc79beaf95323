"""Every family of the registry through the trainer, the reference attention, eval and export (CPU).

For each family a tiny random model is trained jointly (gates and weights, stage 1), its
weights continued with the binary mask (stage 2, ``--save-model``, which exports), and
evaluated on the reference attention; the plain checkpoint is exported with the learned
allocation. No vLLM engine here: tests/test_families.py serves each family.
"""

from __future__ import annotations

import json

import pytest

from consa_vllm import families
from consa_vllm.allocation import Allocation
from consa_vllm.export import export_model, read_exported_allocation
from consa_vllm.tiny import build_tiny_model, stdlib_python_files

CASES = [pytest.param((f.name, {}), id=f.name) for f in families.FAMILIES] + [
    pytest.param(("llama", dict(attention_bias=True, mlp_bias=True)), id="llama-bias")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in stdlib_python_files(4)))
    return path


@pytest.mark.parametrize("case", CASES)
def test_train_eval_export(case, data, tmp_path, capsys):
    from consa_vllm.eval.cli import main as eval_main
    from consa_vllm.train.__main__ import main as train_main

    name, extra = case
    family = families.by_name(name)
    model = build_tiny_model(tmp_path / "model", name, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                             head_dim=32, **extra)
    out = tmp_path / "run" / "alloc.json"
    saved = tmp_path / "stage2"
    rc = train_main(["--model", str(model), "--data", str(data), "--seq-len", "64", "--window", "16",
                     "--steps", "6", "--batch-size", "2", "--target-sparsity", "0.5", "--target-warmup", "0.3",
                     "--stage2-steps", "2", "--save-model", str(saved), "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    alloc = Allocation.load(out)
    assert (alloc.num_layers, alloc.num_kv_heads, alloc.sparsity, alloc.window) == (2, 2, 0.5, 16)

    # Stage 2 wrote an already exported checkpoint of the same family.
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["architectures"] == [family.consa_architecture]
    assert read_exported_allocation(saved).pattern == alloc.pattern

    # The plain checkpoint exported with the learned allocation.
    exported = export_model(model, alloc, tmp_path / "exported")
    assert json.loads((exported / "config.json").read_text())["architectures"] == [family.consa_architecture]

    # Eval on the reference attention (loss and retrieval), on the stage-2 model.
    report = tmp_path / "eval.json"
    rc = eval_main(["--model", str(saved), "--data", str(data), "--contexts", "128", "--depths", "0.5",
                    "--samples", "2", "--loss-sequences", "2", "--out", str(report)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["backend"] == "reference" and r["allocation"]["pattern"] == alloc.pattern
    assert r["loss"] is not None and r["retrieval"] is not None
