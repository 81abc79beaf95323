"""Head layout of kv_head allocations across tensor-parallel ranks (no engine).

vLLM needs identical KV cache specs on every rank, so every rank's F pool and S pool must
have the same number of head slots. The layout balances F heads across ranks (moving heads
between ranks, which is exact because a layer's KV heads are interchangeable) and pads the
pools only where the F total does not divide by the tensor-parallel size.
"""

from __future__ import annotations

import math
import random

import pytest

from consa_vllm.allocation import Allocation
from consa_vllm.plugin.layout import PoolLayout, balance_heads, balance_summary, kv_shards, pool_sizes

PATTERNS = {
    "uneven": ["FSSS", "SSSS", "SFFS", "FFFF"],  # the engine tests' Qwen pattern
    "llama": ["SSFS", "FFFF", "SSSS", "FSFS"],
    "all_f": ["FFFF", "FFFF"],
    "all_s": ["SSSS", "SSSS", "SSSS"],
    "one_f": ["SSSSSSSS", "SSSSSSSS", "SSSSSSSF"],  # fewer F heads than ranks
    "f_on_one_rank": ["FFFFSSSS"] * 5,  # natural split: all F on rank 0
    "odd_total": ["FFFSSSSS", "FSSSSSSS", "SSSSSSSS", "FFFFFFFS"],  # 11 F heads
    "mixed8": ["SSSSSSSS", "FFSSSSFS", "FFFFSSSS", "SFSFSFSF", "FFFFFFFF", "SSSSSSSF"],
}


def _random_patterns(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        h = rng.choice([4, 8])
        layers = rng.randint(1, 7)
        p_f = rng.random()
        out[f"random{i}"] = ["".join("F" if rng.random() < p_f else "S" for _ in range(h)) for _ in range(layers)]
    return out


CASES = [(name, pat, tp) for name, pat in {**PATTERNS, **_random_patterns(30)}.items() for tp in (1, 2, 4)
         if len(pat[0]) % tp == 0]


def _alloc(pattern: list[str]) -> Allocation:
    return Allocation(granularity="kv_head", window=16, pattern=pattern)


@pytest.mark.parametrize("name,pattern,tp", CASES, ids=[f"{n}-tp{t}" for n, _, t in CASES])
def test_layout_is_balanced_permutation_with_minimal_padding(name, pattern, tp):
    alloc = _alloc(pattern)
    h, per_rank = len(pattern[0]), len(pattern[0]) // tp
    ranks = [PoolLayout.build(alloc, tp, r) for r in range(tp)]
    f_total = sum(row.count("F") for row in pattern)
    s_total = len(pattern) * h - f_total

    # vLLM's rule: identical KV specs on every rank, i.e. identical pool sizes.
    assert {(p.full_pool_heads, p.sliding_pool_heads) for p in ranks} == {pool_sizes(pattern, tp)}
    # Minimal: no pool is larger than the balanced share of its heads.
    assert ranks[0].full_pool_heads == math.ceil(f_total / tp)
    assert ranks[0].sliding_pool_heads == math.ceil(s_total / tp)
    # So padding is one slot per rank at most, and none when the F total divides by tp.
    pad = ranks[0].full_pool_heads + ranks[0].sliding_pool_heads - len(pattern) * per_rank
    assert pad == (1 if f_total % tp else 0)

    for l, row in enumerate(pattern):
        order = ranks[0].layers[l].global_order
        assert sorted(order) == list(range(h)), "each layer's heads must be a permutation"
        assert all(p.layers[l].global_order == order for p in ranks), "every rank must permute the checkpoint alike"
        f_per_rank = []
        for r, p in enumerate(ranks):
            lay = p.layers[l]
            # What vLLM's sharded loader hands rank r after the permutation.
            assert lay.kv_heads == order[r * per_rank:(r + 1) * per_rank]
            assert lay.n_full + lay.n_sliding == per_rank
            assert all(row[k] == "F" for k in lay.kv_heads[:lay.n_full])
            assert all(row[k] == "S" for k in lay.kv_heads[lay.n_full:])
            f_per_rank.append(lay.n_full)
        assert sum(f_per_rank) == row.count("F")
        assert max(f_per_rank) - min(f_per_rank) <= 1, "a layer's F heads (attention work) split evenly"

    for p in ranks:
        # Layers pack the pools contiguously from slot 0; the unused slots (if any) are at the end.
        f_off = s_off = 0
        for lay in p.layers:
            assert (lay.full_offset, lay.sliding_offset) == (f_off, s_off)
            f_off += lay.n_full
            s_off += lay.n_sliding
        assert (p.full_used, p.sliding_used) == (f_off, s_off)
        assert f_off <= p.full_pool_heads and s_off <= p.sliding_pool_heads
        assert (p.tp_size, p.tp_rank) in {(tp, r) for r in range(tp)}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_tp1_only_puts_f_heads_first(name):
    pattern = PATTERNS[name]
    p = PoolLayout.build(_alloc(pattern), 1, 0)
    for row, lay in zip(pattern, p.layers):
        f = [k for k, c in enumerate(row) if c == "F"]
        s = [k for k, c in enumerate(row) if c == "S"]
        assert lay.global_order == lay.kv_heads == tuple(f + s)
        assert lay.is_identity == (f + s == list(range(len(row))))
    assert p.full_pool_heads == sum(r.count("F") for r in pattern)
    assert p.sliding_pool_heads == sum(r.count("S") for r in pattern)
    assert balance_summary(_alloc(pattern), 1) is None


def test_heads_stay_on_their_rank_when_already_balanced():
    # Each rank's natural half of every layer already holds one F head: only in-rank reordering.
    pattern = ["SFSF", "FSSF", "SSSS"]
    orders = balance_heads(pattern, 2)
    assert orders == [(1, 0, 3, 2), (0, 1, 3, 2), (0, 1, 2, 3)]
    assert balance_summary(_alloc(pattern), 2) is None


def test_unbalanced_allocation_moves_heads_and_says_so():
    # All F heads sit in rank 0's natural range: each rank must end up with 2 F per layer.
    pattern = ["FFFFSSSS"] * 5
    for r in range(2):
        p = PoolLayout.build(_alloc(pattern), 2, r)
        assert [lay.n_full for lay in p.layers] == [2] * 5
        assert (p.full_pool_heads, p.sliding_pool_heads) == (10, 10)
    note = balance_summary(_alloc(pattern), 2)
    assert note is not None
    assert "moving 20 KV heads" in note and "10 F + 10 S" in note and "unused" not in note


def test_odd_f_total_pads_one_slot_and_says_what_it_costs():
    pattern = PATTERNS["odd_total"]  # 11 F, 21 S over 4 layers x 8 heads
    ranks = [PoolLayout.build(_alloc(pattern), 2, r) for r in range(2)]
    assert sorted((p.full_used, p.sliding_used) for p in ranks) == [(5, 11), (6, 10)]
    assert all((p.full_pool_heads, p.sliding_pool_heads) == (6, 11) for p in ranks)
    note = balance_summary(_alloc(pattern), 2)
    assert "6 F + 11 S" in note and "11 F heads do not divide by 2" in note
    assert "holding 5 F heads leave 1 of 6 F slots empty (16.7% of F-pool KV memory)" in note
    assert "the others 1 of 11 S slots (9.1% of S-pool KV memory)" in note


REPLICATED = [(name, pat, tp) for name, pat in {**PATTERNS, **_random_patterns(30)}.items() for tp in (8, 16)
              if tp > len(pat[0])]


@pytest.mark.parametrize("name,pattern,tp", REPLICATED, ids=[f"{n}-tp{t}" for n, _, t in REPLICATED])
def test_more_ranks_than_kv_heads_serve_vllms_replicas(name, pattern, tp):
    """With tp a multiple of the KV heads (Qwen3-MoE's 4 at tp 8), vLLM's loader replicates
    each head on tp/H adjacent ranks: rank r holds head r // (tp/H) of the served order. Each
    rank's layout is its head's, the balance is over the H heads, and every pool is the same."""
    alloc = _alloc(pattern)
    h = len(pattern[0])
    assert kv_shards(h, tp) == h
    ranks = [PoolLayout.build(alloc, tp, r) for r in range(tp)]
    assert {(p.full_pool_heads, p.sliding_pool_heads) for p in ranks} == {pool_sizes(pattern, h)}
    assert pool_sizes(pattern, tp) == pool_sizes(pattern, h)
    for r, p in enumerate(ranks):
        shard = PoolLayout.build(alloc, h, r // (tp // h))
        assert (p.tp_size, p.tp_rank, p.kv_heads_per_rank) == (tp, r, 1)
        assert p.layers == shard.layers
        for l, lay in enumerate(p.layers):
            assert lay.kv_heads == (lay.global_order[r // (tp // h)],)
            assert lay.n_full == (pattern[l][lay.kv_heads[0]] == "F")
    assert balance_heads(pattern, tp) == balance_heads(pattern, h)


def test_replication_note_names_the_shards():
    note = balance_summary(_alloc(PATTERNS["uneven"]), 8)  # 7 F heads over 4 KV heads, each on 2 ranks
    assert note is not None
    assert "across the 4 KV-head shards (vLLM replicates each KV head on 2 ranks)" in note
    assert "the 7 F heads do not divide by 4" in note


def test_heads_not_divisible_by_tp_are_refused():
    msg = "4 KV heads per layer can be neither split evenly across nor replicated evenly over tensor-parallel size 3"
    with pytest.raises(ValueError, match=msg):
        PoolLayout.build(_alloc(PATTERNS["uneven"]), 3, 0)
    with pytest.raises(ValueError, match="8 KV heads per layer can be neither .* tensor-parallel size 12"):
        PoolLayout.build(_alloc(PATTERNS["mixed8"]), 12, 0)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        PoolLayout.build(_alloc(PATTERNS["uneven"]), 2, 2)


# --- the checkpoint permutation computes the same function ------------------------------


def _tiny_hf(tmp_path, family: str):
    import torch
    from transformers import AutoModelForCausalLM

    from consa_vllm.tiny import build_tiny_model

    d = build_tiny_model(tmp_path / family, family=family, num_layers=3, num_attention_heads=8, num_kv_heads=4,
                         head_dim=16, hidden_size=64, intermediate_size=96, vocab_size=128, tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,tp", [("qwen3", 2), ("llama", 4), ("qwen3", 1)])
def test_permuted_checkpoint_computes_the_same_function(tmp_path, family, tp):
    """Permuting a real HF checkpoint's heads as the plugin does leaves its logits unchanged."""
    import torch

    from consa_vllm.plugin.permute import permute_checkpoint_heads

    model = _tiny_hf(tmp_path, family)
    pattern = ["FSSF", "SSSS", "FFFS"]
    orders = {l: o for l, o in enumerate(balance_heads(pattern, tp)) if o != tuple(range(4))}
    assert orders, "the test needs a non-trivial permutation"
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        state = dict(permute_checkpoint_heads(model.state_dict().items(), orders, 8, 4, 16))
        moved = [n for n in state if not torch.equal(state[n], model.state_dict()[n])]
        # q/k/v/o of every permuted layer changed, nothing else did.
        assert sorted(moved) == sorted(f"model.layers.{l}.self_attn.{p}_proj.weight" for l in orders
                                       for p in "qkvo")
        model.load_state_dict(state)
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_permutation_moves_biases_and_refuses_fused_qkv():
    import torch

    from consa_vllm.plugin.permute import permute_checkpoint_heads

    orders = {0: (1, 0)}  # 2 KV heads, G=2, head_dim 1
    q_bias = torch.arange(4.0)
    k_bias = torch.tensor([10.0, 11.0])
    out = dict(permute_checkpoint_heads([("model.layers.0.self_attn.q_proj.bias", q_bias),
                                         ("model.layers.0.self_attn.k_proj.bias", k_bias),
                                         ("model.layers.0.self_attn.o_proj.bias", q_bias),
                                         ("model.layers.1.self_attn.q_proj.bias", q_bias)], orders, 4, 2, 1))
    assert out["model.layers.0.self_attn.q_proj.bias"].tolist() == [2.0, 3.0, 0.0, 1.0]
    assert out["model.layers.0.self_attn.k_proj.bias"].tolist() == [11.0, 10.0]
    assert out["model.layers.0.self_attn.o_proj.bias"].tolist() == [0.0, 1.0, 2.0, 3.0]  # output features
    assert out["model.layers.1.self_attn.q_proj.bias"].tolist() == [0.0, 1.0, 2.0, 3.0]  # layer not permuted
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.qkv_proj.weight': fused qkv_proj"):
        list(permute_checkpoint_heads([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(8, 3))],
                                      orders, 4, 2, 1))
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(3, 5\); expected 2 along dim 0"):
        list(permute_checkpoint_heads([("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 5))],
                                      orders, 4, 2, 1))


def test_mistral_format_names_permute_as_their_hf_names():
    """``--load-format mistral``: vLLM's MistralForCausalLM.maybe_remap_mistral renames
    ``layers.N.attention.wq`` & co. after the permutation, and reorders wq/wk rows for its
    rotary layout inside each head; permuting first gives what permuting the renamed tensors
    would."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.model_executor.models.mistral import MistralForCausalLM

    from consa_vllm.plugin.permute import permute_checkpoint_heads

    heads, kv_heads, head_dim, hidden = 8, 4, 4, 16
    model = SimpleNamespace(mistral_mapping=MistralForCausalLM.mistral_mapping,
                            config=SimpleNamespace(head_dim=head_dim, num_attention_heads=heads,
                                                   num_key_value_heads=kv_heads, hidden_size=hidden))

    def remap(items):
        return dict(MistralForCausalLM.maybe_remap_mistral(model, n, t) for n, t in items)

    g = torch.Generator().manual_seed(0)
    shapes = {"wq": (heads * head_dim, hidden), "wk": (kv_heads * head_dim, hidden),
              "wv": (kv_heads * head_dim, hidden), "wo": (hidden, heads * head_dim)}
    raw = [(f"layers.{l}.attention.{w}.weight", torch.randn(*shape, generator=g))
           for l in (0, 1) for w, shape in shapes.items()]
    raw.append(("layers.0.attention_norm.weight", torch.randn(hidden, generator=g)))
    orders = {0: (2, 0, 3, 1)}
    first = remap(permute_checkpoint_heads(raw, orders, heads, kv_heads, head_dim))
    renamed = remap(raw)
    after = dict(permute_checkpoint_heads(renamed.items(), orders, heads, kv_heads, head_dim))
    assert first.keys() == after.keys() and "model.layers.0.self_attn.q_proj.weight" in first
    for name in first:
        assert torch.equal(first[name], after[name]), name
    moved = sorted(n for n in first if not torch.equal(first[n], renamed[n]))
    assert moved == sorted(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo")


def test_unknown_attention_tensors_of_permuted_layers_are_refused():
    """A tensor of a permuted layer's attention that the permutation does not know would load
    in checkpoint head order: refused, unless all heads share it or it is one value."""
    import torch

    from consa_vllm.plugin.permute import permute_checkpoint_heads

    orders = {0: (1, 0)}  # 2 KV heads, G=2, head_dim 1
    fine = [("model.layers.0.self_attn.q_norm.weight", torch.ones(1)),
            ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
            ("layers.0.attention.k_fake_quantizer.qscale_act", torch.tensor([0.5])),
            ("model.layers.1.self_attn.k_scale", torch.ones(2)),  # layer 1 keeps its order
            ("model.layers.0.mlp.down_proj.weight", torch.ones(2, 2))]
    out = list(permute_checkpoint_heads(fine, orders, 4, 2, 1))
    assert [n for n, _ in out] == [n for n, _ in fine]
    assert all(t is u for (_, t), (_, u) in zip(out, fine))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_scale' \(shape \(2,\)\) belongs to the "
                                         r"attention of layer 0, whose KV heads the kv_head allocation reorders"):
        list(permute_checkpoint_heads([("model.layers.0.self_attn.k_scale", torch.ones(2))], orders, 4, 2, 1))


def test_per_head_kv_scales_split_between_the_pools_where_no_head_moves():
    """Checkpoint per-KV-head scales (compressed-tensors "attn_head") load through vLLM's own
    loader, which gives each rank its natural head range in checkpoint order. Where a layer's
    heads do not move that is the served order (F heads first), which the backend splits
    between the F and S pools; wherever a head moves, the config check refuses the scheme."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from consa_vllm.plugin.backend import layer_kv_scales
    from consa_vllm.plugin.permute import QuantPermutationError, check_quantized_permutation

    scheme = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"g": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}},
              "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head", "symmetric": True}}
    alloc = Allocation(granularity="kv_head", window=8, pattern=PATTERNS["odd_total"])
    k = torch.arange(8, dtype=torch.float32) + 1  # KV head h has scale h + 1
    kept = moved = 0
    for tp in (1, 2, 4):
        for rank in range(tp):
            for lay in PoolLayout.build(alloc, tp, rank).layers:
                shape = dict(num_heads=16, num_kv_heads=8, head_dim=8)
                if not lay.is_identity:
                    moved += 1
                    with pytest.raises(QuantPermutationError, match="'attn_head' KV-cache scales"):
                        check_quantized_permutation(scheme, {lay.layer: lay.global_order}, **shape)
                    continue
                kept += 1
                check_quantized_permutation(scheme, {lay.layer: lay.global_order}, **shape)
                n = len(lay.kv_heads)
                natural = k[rank * n:(rank + 1) * n]  # vLLM's attn_head loader: this rank's range
                assert natural.tolist() == [h + 1 for h in lay.kv_heads]
                holder = type("Layer", (), {})()  # the three buffers vLLM's attention layer owns
                holder._k_scale, holder._v_scale, holder._q_scale = natural, natural * 10, natural
                (fk, fv, _), (sk, sv, _) = layer_kv_scales(holder, lay.n_full, lay.n_sliding)
                row = alloc.pattern[lay.layer]
                assert all(row[int(s) - 1] == "F" for s in fk.tolist()) and len(fk) == lay.n_full
                assert all(row[int(s) - 1] == "S" for s in sk.tolist()) and len(sk) == lay.n_sliding
                assert fv.tolist() == [10 * s for s in fk.tolist()] and len(sv) == lay.n_sliding
    assert kept and moved


def test_per_tensor_kv_scales_expand_without_copies():
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from consa_vllm.plugin.backend import layer_kv_scales

    holder = type("Layer", (), {})()
    holder._k_scale, holder._v_scale, holder._q_scale = (torch.tensor(v) for v in (0.5, 0.25, 2.0))
    (fk, fv, fq), (sk, sv, sq) = layer_kv_scales(holder, 3, 5)
    assert fk.tolist() == [0.5] * 3 and sv.tolist() == [0.25] * 5 and sq.tolist() == [2.0] * 5
    assert fk.stride() == (0,) and fk.data_ptr() == holder._k_scale.data_ptr()  # views: updates show
    holder._k_scale = torch.ones(4)
    with pytest.raises(ValueError, match=r"_k_scale has 4 values; expected 1 or one per KV head \(8\)"):
        layer_kv_scales(holder, 3, 5)
