"""Every family of the registry, served through vLLM's own model classes (CPU, real engines).

For each family a tiny random checkpoint (MoE ones with 4 experts and top-2 routing) is
exported with an uneven kv_head allocation and served by a real vLLM engine; greedy
tokens and top-5 logprobs must equal the reference attention (HF transformers, patched)
on prompts longer than the window. Llama with ``attention_bias`` and ``mlp_bias`` is
also served all-F and compared with stock vLLM on the same checkpoint: the regression
test for the plugin that once built ``o_proj`` and the MLP without their biases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_harness import TINY, export, max_logprob_gap, prompts_of, reference_generate, run_vllm
from engine_probe import EXTENSION, differing, fingerprints

from consa_vllm import families
from consa_vllm.allocation import Allocation

WINDOW = 24
# An all-F row, an all-S row, mixed rows whose F heads are not the leading ones (the
# loader must permute heads), and uneven F counts per layer (1, 0, 2, 4).
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
LENGTHS = [30, 75, 140, 260]
NEW = 12
ENGINE = dict(max_num_batched_tokens=64, enable_prefix_caching=True, worker_extension_cls=EXTENSION)
pytestmark = pytest.mark.engine

TOL = 1e-3  # float32: stock CPU attention vs an eager reference is ~1e-5; 1e-3 means a bug
BIAS = dict(attention_bias=True, mlp_bias=True)

CASES = [pytest.param((f.name, {}), id=f.name) for f in families.FAMILIES] + [
    pytest.param(("llama", BIAS), id="llama-bias")]


def _served_model_facts(llm) -> dict:
    """What the engine actually built: the class, its bases and what it loaded."""
    def facts(model):
        import torch

        # vLLM's FusedMoE() builds a MoERunner.
        from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import MoERunnerInterface

        sd = {k: v for k, v in model.state_dict().items() if "bias" in k}
        return {"class": type(model).__name__, "mro": [c.__name__ for c in type(model).__mro__],
                "moe_layers": sum(isinstance(m, MoERunnerInterface) for m in model.modules()),
                "bias_tensors": {k: float(v.abs().sum()) for k, v in sd.items() if isinstance(v, torch.Tensor)}}
    return {**llm.apply_model(facts)[0], "fingerprints": fingerprints(llm)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=CASES)
def served(request, root, tiny_model):
    """(family, checkpoint, reference generation, served generation) for one case."""
    name, extra = request.param
    src = tiny_model(name, **{**TINY, **extra})
    dst = export(src, root / f"{name}{'-bias' if extra else ''}-consa", PATTERN, WINDOW)
    prompts = prompts_of(LENGTHS, seed=3)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    ref = reference_generate(src, alloc, prompts, NEW)
    got = run_vllm(dst, prompts, NEW, inspect=_served_model_facts, **ENGINE)
    return families.by_name(name), src, ref, got


def test_greedy_parity_with_reference(served):
    family, src, ref, got = served
    assert got.tokens == ref.tokens
    assert max_logprob_gap(ref, got) < TOL


def test_served_class_is_vllms_own(served):
    family, src, _, got = served
    facts = got.extra
    assert facts["class"] == family.consa_architecture
    # The ConSA class subclasses vLLM's class for the family: its layers, MLPs and loading.
    assert family.vllm_class.rsplit(":", 1)[1] in facts["mro"]
    cfg = json.loads((src / "config.json").read_text())
    if family.is_moe:
        assert facts["moe_layers"] == cfg["num_hidden_layers"]
        assert cfg["num_experts_per_tok"] > 1
    else:
        assert facts["moe_layers"] == 0


@pytest.fixture(scope="module")
def llama_bias_all_full(root, tiny_model):
    """Stock vLLM and the all-F ConSA model on one Llama checkpoint with every bias."""
    src = tiny_model("llama", **{**TINY, **BIAS})
    prompts = prompts_of(LENGTHS, seed=4)
    stock = run_vllm(src, prompts, NEW, inspect=_served_model_facts, **ENGINE)
    consa = run_vllm(export(src, root / "llama-bias-allF", ["FFFF"] * 4, WINDOW), prompts, NEW,
                     inspect=_served_model_facts, **ENGINE)
    return stock, consa


def test_llama_biases_all_full_equals_stock(llama_bias_all_full):
    stock, consa = llama_bias_all_full
    assert consa.tokens == stock.tokens
    assert max_logprob_gap(stock, consa) < TOL
    # Same bias tensors loaded (o_proj and MLP biases included), none of them zero.
    biases = stock.extra["bias_tensors"]
    assert any(".o_proj." in k for k in biases) and any(".mlp." in k for k in biases)
    assert consa.extra["bias_tensors"] == biases
    assert all(v > 0 for v in biases.values())


def test_weight_fingerprints_all_full_equal_stock(llama_bias_all_full):
    """The GPU tests' weight fingerprints (tests/engine_probe.py, through a vLLM worker
    extension) on real engines: an all-F ConSA engine holds exactly stock vLLM's weights, and
    the fingerprints see a one-element change."""
    stock, consa = (g.extra["fingerprints"] for g in llama_bias_all_full)
    assert any(n.endswith("o_proj.bias") for n in stock) and any("embed_tokens" in n for n in stock)
    assert len(stock.keys() & consa.keys()) == len(stock)  # every stock weight is in the ConSA engine
    assert differing(stock, consa) == []
    name = next(n for n in sorted(stock) if ".layers.1." in n and n.endswith(".weight"))
    nudged = {**consa, name: [consa[name][0] + 1e-3 * abs(consa[name][0]), *consa[name][1:]]}
    assert differing(stock, nudged) == [name]
