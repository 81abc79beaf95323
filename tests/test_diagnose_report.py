"""benchmarks/diagnose_parity_report.py: it names the wrong computation an engine did.

The "engine" here is Hugging Face itself with one hypothesised corruption applied (layer i's
MoE block taken from layer i+1): its greedy tokens and logprobs make a parity report, and the
diagnosis must pick that hypothesis, at float32 agreement, over the model as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine_harness import prompts_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import diagnose_parity_report as diag  # noqa: E402


def _greedy(model, prompts, new):
    import torch

    toks, lps = [], []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            row_t, row_l = [], []
            for _ in range(new):
                lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), dim=-1)
                t = int(lp.argmax())
                row_t.append(t)
                row_l.append(float(lp[t]))
                seq.append(t)
            toks.append(row_t)
            lps.append(row_l)
    return toks, lps


def test_diagnosis_names_the_corruption(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_model("mixtral")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prompts = prompts_of([9, 30, 50], seed=5)
    with diag.replaced(model, diag.hypotheses(model)["mlp_shift1"](model.state_dict())):
        toks, lps = _greedy(model, prompts, 6)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"prompts": prompts, "prompt_lengths": [len(p) for p in prompts],
                                  "variants": {"engine": {"allocation": None}},
                                  "outputs": {"engine": {"tokens": toks, "logprobs": lps}}}))
    out = tmp_path / "scores.json"
    assert diag.main([str(report), "--model", str(src), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]["engine"]
    best = min(scores, key=scores.get)
    assert best == "mlp_shift1", scores
    assert scores["mlp_shift1"] < 1e-4 and scores["as_is"] > 100 * scores["mlp_shift1"], scores


@pytest.mark.parametrize("argv, message", [
    (["missing.json", "--family", "mixtral"], "no such file"),
    (["REPORT", "--family", "nope"], "--family nope: not one of"),
    (["REPORT"], "exactly one of --family and --model"),
    (["REPORT", "--family", "mixtral", "--variant", "x"], "--variant x: not in the report"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"outputs": {"engine": {"tokens": [], "logprobs": []}}}))
    argv = [str(report) if a == "REPORT" else str(tmp_path / a) if a == "missing.json" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        diag.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
