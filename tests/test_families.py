"""Every family of the registry, served through vLLM's own model classes (CPU, real engines).

For each family a tiny random checkpoint (MoE ones with 4 experts and top-2 routing) is
exported with an uneven kv_head allocation and served by a real vLLM engine; greedy
tokens and top-5 logprobs must equal the reference attention (HF transformers, patched)
on prompts longer than the window. Llama with ``attention_bias`` and ``mlp_bias`` is
also served all-F and compared with stock vLLM on the same checkpoint: the regression
test for the plugin that once built ``o_proj`` and the MLP without their biases.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from engine_harness import export, max_logprob_gap, prompts_of, reference_generate, run_vllm, tiny_model

from consa_vllm import families
from consa_vllm.allocation import Allocation

WINDOW = 24
# An all-F row, an all-S row, mixed rows whose F heads are not the leading ones (the
# loader must permute heads), and uneven F counts per layer (1, 0, 2, 4).
PATTERN = ["FSSS", "SSSS", "SFFS", "FFFF"]
LENGTHS = [30, 75, 140, 260]
NEW = 12
ENGINE = dict(max_num_batched_tokens=64, enable_prefix_caching=True)
TOL = 1e-3  # float32: stock CPU attention vs an eager reference is ~1e-5; 1e-3 means a bug
BIAS = dict(attention_bias=True, mlp_bias=True)

CASES = [pytest.param((f.name, {}), id=f.name) for f in families.FAMILIES] + [
    pytest.param(("llama", BIAS), id="llama-bias")]


def _served_model_facts(llm) -> dict:
    """What the engine actually built: the class, its bases and what it loaded."""
    def facts(model):
        import torch

        from vllm.model_executor.layers.fused_moe import FusedMoE

        sd = {k: v for k, v in model.state_dict().items() if "bias" in k}
        return {"class": type(model).__name__, "mro": [c.__name__ for c in type(model).__mro__],
                "moe_layers": sum(isinstance(m, FusedMoE) for m in model.modules()),
                "bias_tensors": {k: float(v.abs().sum()) for k, v in sd.items() if isinstance(v, torch.Tensor)}}
    return llm.apply_model(facts)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=CASES)
def served(request, root):
    """(family, checkpoint, reference generation, served generation) for one case."""
    name, extra = request.param
    src = tiny_model(root / ("bias" if extra else "plain"), name, **extra)
    dst = export(src, root / f"{name}{'-bias' if extra else ''}-consa", PATTERN, WINDOW)
    prompts = prompts_of(LENGTHS, seed=3)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    ref = reference_generate(src, alloc, prompts, NEW)
    got = run_vllm(dst, prompts, NEW, inspect=_served_model_facts, **ENGINE)
    return families.by_name(name), src, ref, got


@pytest.mark.engine
def test_greedy_parity_with_reference(served):
    family, src, ref, got = served
    assert got.tokens == ref.tokens
    assert max_logprob_gap(ref, got) < TOL


@pytest.mark.engine
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
def llama_bias_all_full(root):
    """Stock vLLM and the all-F ConSA model on one Llama checkpoint with every bias."""
    src = tiny_model(root / "bias", "llama", **BIAS)
    prompts = prompts_of(LENGTHS, seed=4)
    stock = run_vllm(src, prompts, NEW, inspect=_served_model_facts, **ENGINE)
    consa = run_vllm(export(src, root / "llama-bias-allF", ["FFFF"] * 4, WINDOW), prompts, NEW,
                     inspect=_served_model_facts, **ENGINE)
    return stock, consa


@pytest.mark.engine
def test_llama_biases_all_full_equals_stock(llama_bias_all_full):
    stock, consa = llama_bias_all_full
    assert consa.tokens == stock.tokens
    assert max_logprob_gap(stock, consa) < TOL
    # Same bias tensors loaded (o_proj and MLP biases included), none of them zero.
    biases = stock.extra["bias_tensors"]
    assert any(".o_proj." in k for k in biases) and any(".mlp." in k for k in biases)
    assert consa.extra["bias_tensors"] == biases
    assert all(v > 0 for v in biases.values())


# ------------------------------------------------------------------ one source of truth

PACKAGE = Path(__file__).resolve().parents[1] / "consa_vllm"


def _family_tokens() -> dict[str, str]:
    """Every name that identifies a family -> the family."""
    from transformers import AutoConfig

    tokens = {}
    for f in families.FAMILIES:
        config_class = type(AutoConfig.for_model(f.model_type)).__name__
        for t in (f.hf_architecture, f.consa_architecture, f.model_type, config_class,
                  f.vllm_class.split(":")[0], f.vllm_class.split(":")[1], f.hf_attention.split(":")[1]):
            tokens[t] = f.name
    return tokens


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_families_are_named_only_in_the_registry():
    """No module of the package but consa_vllm/families.py names a family in code.

    Code means string literals (outside docstrings), identifiers, attributes and imports.
    """
    tokens = _family_tokens()
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "families.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            found = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found = [t for t in tokens if t == node.value or (len(t) > 8 and t in node.value)]
            elif isinstance(node, ast.Name):
                found = [t for t in tokens if t == node.id]
            elif isinstance(node, ast.Attribute):
                found = [t for t in tokens if t == node.attr]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                found = [t for t in tokens for n in names if t == n or t in n.split(".")]
            hits += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {t}" for t in found]
    assert not hits, "family named outside consa_vllm/families.py:\n" + "\n".join(hits)


def test_unknown_family_refused_with_the_supported_list(tmp_path):
    from consa_vllm.export import ExportError, exported_config
    from consa_vllm.plugin import models  # noqa: F401  (lazy class lookup only; no engine)

    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256}
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    with pytest.raises(ExportError) as e:
        exported_config(cfg, alloc)
    assert "'GPT2LMHeadModel'" in str(e.value)
    for f in families.FAMILIES:
        assert f.hf_architecture in str(e.value)
    with pytest.raises(AttributeError):
        getattr(models, "ConsaGPT2LMHeadModel")


def test_plain_architecture_with_an_allocation_refused_by_vllm(root):
    """vLLM's own config building (as under ``vllm serve``) refuses a checkpoint whose
    config.json carries an allocation under the plain architecture, before any weight loads."""
    from vllm.engine.arg_utils import EngineArgs

    src = tiny_model(root / "plain", "qwen3_moe")
    dst = export(src, root / "plain-arch-consa", PATTERN, WINDOW)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    # vLLM's pydantic ModelConfig wraps the hook's AllocationError (a ValueError).
    with pytest.raises(ValueError) as e:
        EngineArgs(model=str(dst), max_model_len=512).create_engine_config()
    msg = str(e.value)
    assert str(dst / "config.json") in msg and "'ConsaQwen3MoeForCausalLM'" in msg and "field 'consa'" in msg
