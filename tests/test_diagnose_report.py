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


RUN14 = Path(__file__).resolve().parent.parent / "benchmarks/results/gpu_parity_h200/run14-mixtral-hashseeds"


@pytest.mark.parametrize("report, wrong", [("all_f.r4.json", "stock_all_f"),
                                           ("all_f_nolayername.r2.json", "consa_all_f"),
                                           ("all_f_nolayername.r6.json", "stock_all_f"),
                                           ("all_f.r1.json", None)])
def test_wrong_engine_check_on_run14(report, wrong):
    """The GPU tests' sanity check of every engine, on run 14's real reports: a wrong stock
    engine fails the run too (those two once passed "ConSA no worse than stock")."""
    from gpu_parity import ErrorStats, check_engines_served_their_model

    d = json.loads((RUN14 / report).read_text())
    results = {k: ErrorStats(**v) for k, v in d["stats"].items()}
    hf = {k: ErrorStats(**v) for k, v in d["plain_hf_bf16"].items()}
    if wrong is None:
        check_engines_served_their_model(results, hf)
        return
    with pytest.raises(AssertionError) as e:
        check_engines_served_their_model(results, hf)
    assert f"{wrong} (mean |dlogprob|" in str(e.value)
    assert [n for n in results if n != wrong][0] not in str(e.value)


def test_private_caches_hold_an_engines_generated_code(tmp_path):
    """The GPU tests' ``all_f_privatecache`` variant: :func:`gpu_parity.cache_env` sends a
    process's Inductor output under its own root (a real ``torch.compile`` in a subprocess),
    and :func:`gpu_parity.pack_caches` keeps the generated code, not the binaries."""
    import os
    import subprocess
    import tarfile

    from gpu_parity import cache_env, pack_caches

    root = tmp_path / "caches"
    code = ("import torch\n"
            "f = torch.compile(lambda x: (x * x).sum(-1).rsqrt())\n"
            "print(float(f(torch.ones(4, 8))[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **cache_env(root)}).stdout.strip()
    assert abs(float(out) - 8 ** -0.5) < 1e-6
    assert sorted(cache_env(root)) == ["TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT"]
    assert cache_env(None) == {}
    (root / "inductor" / "binary.so").write_bytes(b"\0")  # binaries stay out
    pack_caches(root, tmp_path / "caches.tgz")
    with tarfile.open(tmp_path / "caches.tgz") as tar:
        names = tar.getnames()
    generated = [n for n in names if n.startswith("inductor/") and n.endswith(".py")]
    assert generated, names  # the kernel Inductor wrote for this process, in its private root
    assert "rsqrt" in "".join(tarfile.open(tmp_path / "caches.tgz").extractfile(n).read().decode()
                              for n in generated)
    assert not any(n.endswith(".so") for n in names)
    pack_caches(tmp_path / "absent", tmp_path / "none.tgz")  # an engine that never started: nothing
    assert not (tmp_path / "none.tgz").exists()


RUN15 = RUN14.parent / "run15-mixtral-fingerprints"


@pytest.mark.parametrize("report, wrong", [("all_f.r1.json", "stock_all_f"), ("all_f.r5.json", "consa_all_f")])
def test_first_token_split_on_run15(report, wrong):
    """Run 15's wrong engines are as wrong at the first token (the prefill, no CUDA graph) as
    later, and their right pairs are not: the split the diagnosis prints, on the real reports."""
    d = json.loads((RUN15 / report).read_text())
    split = diag.first_token_split(d)
    assert sorted(split) == sorted(d["per_token"])
    right = next(n for n in split if n != wrong)
    assert split[wrong][0] > 20 * split[right][0] and split[wrong][1] > 20 * split[right][1], split
    assert split[wrong][0] > 0.5 * split[wrong][1], split  # the prefill is not the healthy part
    # the split is the overall mean, re-weighted: first token 1 of the 32 generated
    overall = (split[wrong][0] + 31 * split[wrong][1]) / 32
    assert abs(overall - d["stats"][wrong]["mean"]) < 1e-6 * max(1.0, overall)
    assert diag.first_token_split({"stats": {}}) == {}


RUN16 = Path(__file__).resolve().parent.parent / "benchmarks/results/gpu_parity_h200/run16-mixtral-router-padding"


def test_padded_router_logits_are_the_wrong_engines_of_run16():
    """Run 16's 24 engines with private caches (two calls): the engines whose generated code
    hands vLLM's MoE op padded router logits are exactly the engines that served a wrong model
    (benchmarks/padded_router_logits.py on the committed caches, the verdicts from each report)."""
    import padded_router_logits as prl

    from gpu_parity import WRONG_MODEL_FACTOR

    verdicts = {}
    for call in ("a", "b"):
        for report in sorted((RUN16 / call).glob("all_f_privatecache.r*.json")):
            r = report.name.split(".")[1]
            data = json.loads(report.read_text())
            for engine, s in data["stats"].items():
                wrong = s["mean"] > WRONG_MODEL_FACTOR * data["plain_hf_bf16"][engine]["mean"]
                caches = RUN16 / call / f"privatecache.{r}.caches-{engine}.tgz"
                if caches.exists():
                    verdicts[(call, r, engine)] = (wrong, prl.scan_caches(caches)["padded"])
    assert len(verdicts) == 14  # call b's 12 engines and one pair of call a's
    assert sum(w for w, _ in verdicts.values()) == 5
    assert all(wrong == padded for wrong, padded in verdicts.values()), verdicts


def test_padded_router_logits_reads_the_moe_call():
    import padded_router_logits as prl

    dense = "buf4 = torch.ops.vllm.moe_forward.default(buf2, buf3, None, None, arg6_1, 0)"
    padded = ("buf5 = torch.ops.vllm.moe_forward.default(buf2, reinterpret_tensor(buf4, (s72, 4), (8, 1), 0), "
              "None, None, arg6_1, 0)")
    aligned_view = ("buf5 = torch.ops.vllm.moe_forward.default(buf2, reinterpret_tensor(buf4, (s72, 8), (8, 1), 0), "
                    "None, None, arg6_1, 0)")
    assert prl.scan_sources({"a.py": dense}) == {"moe_calls": 1, "padded_calls": [], "padded": False}
    got = prl.scan_sources({"a.py": dense, "b.py": padded})
    assert got["moe_calls"] == 2 and got["padded_calls"] == [{"file": "b.py", "experts": 4, "row_stride": 8}]
    assert not prl.scan_sources({"c.py": aligned_view})["padded"]


def test_padded_router_logits_refuses_what_is_not_a_cache(tmp_path, capsys):
    import padded_router_logits as prl

    (tmp_path / "empty").mkdir()
    assert prl.main([str(tmp_path / "empty")]) == 2
    assert "no generated Python code" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prl.main([str(tmp_path / "missing.tgz")])
    assert "no such file" in capsys.readouterr().err
