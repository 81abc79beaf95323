"""consa_vllm.eval against a real vLLM server: the served metrics equal the reference ones.

One ``consa-vllm serve`` subprocess (CPU, float32) on a tiny random Qwen3 exported with a
mixed kv_head allocation; queried through the official ``openai`` client by
:class:`consa_vllm.eval.vllm_client.ServedModel` and by ``consa-vllm eval --served-url``.
"""

from __future__ import annotations

import random

import pytest

from server_harness import consa_serve

pytest.importorskip("openai")
pytest.importorskip("vllm")

WINDOW = 24
PATTERN = ["FFSS", "SSSS", "FSSS", "FFFS"]
MAX_MODEL_LEN = 256
LOSS_ATOL = 1e-3  # float32 CPU: vLLM vs reference logprobs agree to ~1e-5 (docs/DESIGN.md §10)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    root = tmp_path_factory.mktemp("eval-served")
    src = tiny_model(num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32,
                     max_position_embeddings=MAX_MODEL_LEN)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    return {"dir": export_model(src, alloc, root / "tiny-consa", force=True), "allocation": alloc}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("eval-served-log") / "server.log"
    with consa_serve(checkpoint["dir"], log_path, max_model_len=MAX_MODEL_LEN) as srv:
        yield srv["base"]


@pytest.fixture(scope="module")
def reference(checkpoint):
    from consa_vllm.eval.cli import load_reference

    return load_reference(checkpoint["dir"], checkpoint["allocation"], WINDOW, device="cpu")


@pytest.fixture(scope="module")
def prompts(checkpoint, reference):
    """Retrieval prompts; half get the reference's own greedy continuation as answer (so some pass)."""
    import torch
    from transformers import AutoTokenizer

    from consa_vllm.eval.tasks import KV, PASSKEY, Filler, make_samples

    tok = AutoTokenizer.from_pretrained(str(checkpoint["dir"]))
    samples = make_samples([PASSKEY, KV], tok, Filler(tok, None, 400), [120, 200], [0.0, 0.5], 2, seed=5,
                           window=WINDOW)
    with torch.no_grad():
        for s in samples[::2]:
            s.answer_ids = reference(input_ids=torch.tensor([s.prompt_ids])).logits[0, -1:].argmax(-1).tolist()
    return samples


def test_served_retrieval_verdicts_equal_the_reference(server, reference, prompts):
    from consa_vllm.eval.metrics import score_retrieval
    from consa_vllm.eval.vllm_client import ServedModel

    served = ServedModel(server)
    got = served.score_retrieval(prompts)
    want = score_retrieval(reference, prompts)
    assert got == want and any(want) and not all(want)


def test_served_loss_equals_the_reference_by_bucket(server, reference):
    import torch

    from consa_vllm.eval.metrics import lm_loss
    from consa_vllm.eval.vllm_client import ServedModel

    rng = random.Random(0)
    seqs = torch.tensor([[rng.randrange(3, 500) for _ in range(160)] for _ in range(2)])
    served = ServedModel(server).lm_loss(seqs, WINDOW)
    ref = lm_loss(reference, seqs, WINDOW)
    assert served["tokens"] == ref["tokens"]
    assert served["loss"] == pytest.approx(ref["loss"], abs=LOSS_ATOL)
    for a, b in zip(served["buckets"], ref["buckets"], strict=True):
        assert a["positions"] == b["positions"] and a["loss"] == pytest.approx(b["loss"], abs=LOSS_ATOL)
    assert len(served["loss_beyond_window_per_sequence"]) == len(ref["loss_beyond_window_per_sequence"]) == 2
    for a, b in zip(served["loss_beyond_window_per_sequence"], ref["loss_beyond_window_per_sequence"]):
        assert a == pytest.approx(b, abs=LOSS_ATOL)


def test_cli_served_report_equals_reference_report(server, checkpoint, tmp_path, capsys):
    from consa_vllm.eval import cli

    data = tmp_path / "heldout.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 100)
    common = ["--model", str(checkpoint["dir"]), "--data", str(data), "--contexts", "160", "--depths", "0",
              "--samples", "3", "--loss-sequences", "2", "--device", "cpu"]
    assert cli.main(common + ["--served-url", server, "--out", str(tmp_path / "served.json")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "ref.json")]) == 0
    capsys.readouterr()
    served = cli.EvalReport.model_validate_json((tmp_path / "served.json").read_text())
    ref = cli.EvalReport.model_validate_json((tmp_path / "ref.json").read_text())
    assert served.backend == "served" and ref.backend == "reference"
    assert served.allocation["pattern"] == PATTERN  # read from the exported config.json
    assert served.retrieval["cells"] == ref.retrieval["cells"]
    assert served.loss["loss"] == pytest.approx(ref.loss["loss"], abs=LOSS_ATOL)
