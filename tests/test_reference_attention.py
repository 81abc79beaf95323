"""Reference hybrid attention (consa_vllm.reference) against HF's own models and a naive eager oracle.

Tiny random models (head_dim 32, 3 layers, 8 query / 4 KV heads), sequences longer than the window.
"""

from __future__ import annotations

import pytest
import torch

from consa_vllm.allocation import Allocation, AllocationError
from consa_vllm.reference import (
    HybridAttentionState, full_attention, hybrid_attention, patch_model, sliding_attention, unpatch_model,
)
from consa_vllm.tiny import build_tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402

W = 16
LAYERS, QH, KVH, HD = 3, 8, 4, 32
MIXED = ["FSSF", "SSSS", "SFFS"]           # genuinely mixed kv_head allocation
LAYERWISE = ["SSSS", "FFFF", "SSSS"]        # layer granularity
FAMILIES = ["qwen3", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_model(d, family=request.param, num_layers=LAYERS, num_attention_heads=QH, num_kv_heads=KVH,
                     head_dim=HD, hidden_size=128, intermediate_size=256, tokenizer=False)
    return d


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen3-oracle")
    build_tiny_model(d, family="qwen3", num_layers=LAYERS, num_attention_heads=QH, num_kv_heads=KVH,
                     head_dim=HD, hidden_size=128, intermediate_size=256, tokenizer=False)
    return d


def load(d, dtype=torch.float32, **config_overrides):
    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **config_overrides).eval()


def alloc(pattern, granularity="kv_head", window=W):
    return Allocation(granularity=granularity, window=window, pattern=pattern)


def ids(batch=2, t=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (batch, t), generator=g)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- naive eager oracle
def naive_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Explicit per-query-head masks, one head at a time; pattern from module._naive_pattern."""
    pattern, window = module._naive_pattern, module._naive_window
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    q_slot = torch.arange(tk - tq, tk)[:, None]
    k_slot = torch.arange(tk)[None, :]
    out = torch.zeros_like(query)
    for j in range(hq):
        kv = j // g
        allowed = (k_slot <= q_slot).expand(b, tq, tk)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, 0]
        if pattern[module.layer_idx][kv] == "S":
            allowed = allowed & (k_slot > q_slot - window)
        scores = (query[:, j] @ key[:, kv].transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0, as SDPA
        out[:, j] = probs @ value[:, kv]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("naive_consa_test", naive_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("naive_consa_test", sdpa_mask)


def naive_model(d, pattern, window=W):
    m = load(d)
    m.config._attn_implementation = "naive_consa_test"
    for layer in m.model.layers:
        layer.self_attn._naive_pattern = pattern
        layer.self_attn._naive_window = window
    return m


def left_pad(seqs, pad_id=0):
    """Left-padded batch: input_ids, attention_mask, position_ids (as generate computes them)."""
    t = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, pos


# --------------------------------------------------------------------------- tests
@torch.no_grad()
def test_all_f_equals_stock(model_dir):
    m = load(model_dir)
    x = ids()
    stock = m(x).logits
    state = patch_model(m, W)
    assert m.config._attn_implementation == "consa" and m.consa_state is state
    all_f = m(x).logits
    state.set_allocation(alloc(["FFFF"] * LAYERS))
    explicit = m(x).logits
    assert maxdiff(all_f, stock) < 1e-5
    assert maxdiff(explicit, stock) < 1e-5
    state.set_allocation(alloc(MIXED))
    assert maxdiff(m(x).logits, stock) > 1e-2  # S heads really change the output
    state.disable()
    assert maxdiff(m(x).logits, stock) == 0.0
    state.enable()
    unpatch_model(m)
    assert m.config._attn_implementation == "sdpa" and not hasattr(m, "consa_state")
    assert maxdiff(m(x).logits, stock) == 0.0


@torch.no_grad()
def test_layer_allocation_equals_hf_sliding(qwen3_dir):
    layer_types = ["sliding_attention" if row[0] == "S" else "full_attention" for row in LAYERWISE]
    oracle = load(qwen3_dir, layer_types=layer_types, sliding_window=W, use_sliding_window=True)
    assert oracle.config.sliding_window == W and oracle.model.layers[0].self_attn.sliding_window == W
    dense = load(qwen3_dir)
    m = load(qwen3_dir)
    patch_model(m, W, alloc(LAYERWISE, granularity="layer"))
    x = ids()
    want = oracle(x).logits
    assert maxdiff(want, dense(x).logits) > 1e-2  # the oracle really slides
    assert maxdiff(m(x).logits, want) < 1e-5
    # left padding too (HF's own sliding mask with padding is the oracle)
    input_ids, mask, pos = left_pad([x[0, :120], x[1, :70]])
    want = oracle(input_ids, attention_mask=mask, position_ids=pos).logits
    got = m(input_ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert maxdiff(got[real], want[real]) < 1e-5


@torch.no_grad()
def test_layer_allocation_on_model_with_native_sliding_layers(qwen3_dir):
    """The allocation overrides a model's own layer_types; disable() restores them."""
    native = ["sliding_attention", "full_attention", "full_attention"]
    m = load(qwen3_dir, layer_types=native, sliding_window=W, use_sliding_window=True)
    x = ids(t=80)
    stock = m(x).logits
    patch_model(m, W, alloc(["FFFF"] * LAYERS))
    assert maxdiff(m(x).logits, load(qwen3_dir)(x).logits) < 1e-5  # all-F means dense
    m.consa_state.disable()
    assert m.config.layer_types == native
    assert maxdiff(m(x).logits, stock) == 0.0


@torch.no_grad()
def test_uniform_kv_head_rows_equal_layerwise(model_dir):
    m = load(model_dir)
    x = ids()
    state = patch_model(m, W, alloc(LAYERWISE, granularity="layer"))
    layerwise = m(x).logits
    state.set_allocation(alloc(LAYERWISE, granularity="kv_head"))
    assert maxdiff(m(x).logits, layerwise) < 1e-6


@pytest.mark.parametrize("swa_backend", ["sdpa", "chunked"])
@torch.no_grad()
def test_mixed_kv_head_equals_naive(model_dir, swa_backend):
    naive = naive_model(model_dir, MIXED)
    m = load(model_dir)
    patch_model(m, W, alloc(MIXED), swa_backend=swa_backend, chunk=24)
    x = ids(t=130)
    want = naive(x).logits
    assert maxdiff(m(x).logits, want) < 1e-5
    # sanity of the oracle itself: all-F naive == stock HF
    assert maxdiff(naive_model(model_dir, ["FFFF"] * LAYERS)(x).logits, load(model_dir)(x).logits) < 1e-5
    # left-padded batch, against the naive oracle and against each row alone
    input_ids, mask, pos = left_pad([x[0, :130], x[1, :57]])
    got = m(input_ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert maxdiff(got[real], naive(input_ids, attention_mask=mask, position_ids=pos).logits[real]) < 1e-5
    alone = m(x[1:, :57]).logits[0]
    assert maxdiff(got[1, -57:], alone) < 1e-5


@torch.no_grad()
def test_chunked_equals_band_mask_kernel():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 150, 32, generator=g) for _ in range(3))
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    mask = torch.tril(torch.ones(150, 150, dtype=torch.bool))[None, None] & pad[:, None, None, :]
    for m_ in (None, mask):
        a = sliding_attention(q, k, v, m_, 32 ** -0.5, window=20, backend="sdpa")
        b = sliding_attention(q, k, v, m_, 32 ** -0.5, window=20, backend="chunked", chunk=16)
        assert maxdiff(a, b) < 1e-5
    # decode shape: one query at the end of 150 keys sees only the last W
    a = sliding_attention(q[:, :, -1:], k, v, None, 32 ** -0.5, window=20, backend="sdpa")
    b = full_attention(q[:, :, -1:], k[:, :, -20:], v[:, :, -20:], None, 32 ** -0.5)
    assert maxdiff(a, b) < 1e-6


def test_gates_kernel_mix_and_extremes():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 64, 32, generator=g)
    k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(2))
    s = 32 ** -0.5
    fa = hybrid_attention(q, k, v, None, s, 12, full_kv_heads=[0, 1, 2, 3])
    swa = hybrid_attention(q, k, v, None, s, 12, full_kv_heads=[])
    assert maxdiff(hybrid_attention(q, k, v, None, s, 12, gates=torch.ones(4)), fa) < 1e-6
    assert maxdiff(hybrid_attention(q, k, v, None, s, 12, gates=torch.zeros(4)), swa) < 1e-6
    z = torch.tensor([0.0, 0.25, 0.9, 1.0])
    zq = z.repeat_interleave(2).view(1, 8, 1, 1)
    assert maxdiff(hybrid_attention(q, k, v, None, s, 12, gates=z), zq * fa + (1 - zq) * swa) < 1e-6
    # binary gates == binary allocation (head 1 and 3 F)
    zb = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert maxdiff(hybrid_attention(q, k, v, None, s, 12, gates=zb),
                   hybrid_attention(q, k, v, None, s, 12, full_kv_heads=[1, 3])) < 1e-6


def test_gates_model_extremes_and_gradient(model_dir):
    m = load(model_dir)
    x = ids(batch=1, t=100)
    state = patch_model(m, W)
    with torch.no_grad():
        fa = m(x).logits
        state.set_allocation(alloc(["SSSS"] * LAYERS))
        swa = m(x).logits
        state.set_allocation(alloc(MIXED))
        mixed = m(x).logits
        state.set_gates(torch.ones(LAYERS, KVH))
        assert maxdiff(m(x).logits, fa) < 1e-5
        state.set_gates(torch.zeros(LAYERS))  # layer units, expanded to [L, H]
        assert maxdiff(m(x).logits, swa) < 1e-5
        state.set_gates(torch.tensor([[c == "F" for c in row] for row in MIXED], dtype=torch.float32))
        assert maxdiff(m(x).logits, mixed) < 1e-5
        state.set_gates(None)  # back to the allocation
        assert maxdiff(m(x).logits, mixed) == 0.0

    # gradient w.r.t. z: nonzero, and equal to a finite difference (float64)
    m.double()
    for p in m.parameters():
        p.requires_grad_(False)
    x = ids(batch=1, t=48)
    target = torch.randn(1, 48, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(z):
        state.set_gates(z)
        return (m(x).logits * target).mean()

    z0 = torch.rand(LAYERS, KVH, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    loss(z).backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs() > 1e-8).all()
    # eps not tiny: HF RMSNorm computes in float32 even in a float64 model (~1e-7 noise), so compare
    # against the scale of the whole gradient, per coordinate and along a random direction.
    eps = 1e-3
    scale = z.grad.abs().max().item()
    with torch.no_grad():
        for (layer, head) in [(0, 0), (1, 2), (2, 3)]:
            dz = torch.zeros_like(z0)
            dz[layer, head] = eps
            fd = (loss(z0 + dz) - loss(z0 - dz)) / (2 * eps)
            assert abs(fd.item() - z.grad[layer, head].item()) < 1e-3 * scale
        d = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        fd = (loss(z0 + eps * d) - loss(z0 - eps * d)) / (2 * eps)
        analytic = (z.grad * d).sum()
        assert abs(fd.item() - analytic.item()) < 1e-3 * abs(analytic.item())
    # window 16 < T=48, so W matters in every S branch
    assert W < x.shape[1]


@torch.no_grad()
def test_cached_greedy_generate_matches_full_forward(model_dir):
    m = load(model_dir)
    patch_model(m, W, alloc(MIXED))
    prompts = [ids(batch=1, t=40, seed=5)[0], ids(batch=1, t=23, seed=6)[0]]  # both longer than W
    input_ids, mask, _ = left_pad(prompts)
    out = m.generate(input_ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                     eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    gen_logits = torch.stack(out.logits, dim=1)  # [B, 30, V]
    for i, p in enumerate(prompts):
        seq = torch.cat([p, out.sequences[i, input_ids.shape[1]:]])[None]
        full = m(seq).logits[0, len(p) - 1:-1]  # uncached, unpadded
        assert torch.equal(full.argmax(-1), out.sequences[i, input_ids.shape[1]:])
        assert maxdiff(full, gen_logits[i]) < 1e-4


def test_bfloat16_runs_and_tracks_float32(model_dir):
    x = ids(batch=1, t=96)
    ref = load(model_dir)
    patch_model(ref, W, alloc(MIXED))
    m = load(model_dir, dtype=torch.bfloat16)
    state = patch_model(m, W, alloc(MIXED))
    with torch.no_grad():
        a, b = ref(x).logits, m(x).logits
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert maxdiff(a, b) < 0.25 * a.abs().max().item()
    z = torch.full((LAYERS, KVH), 0.5, requires_grad=True)
    state.set_gates(z)
    m(x).logits.float().square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_validation_errors(model_dir):
    m = load(model_dir)
    with pytest.raises(AllocationError, match="layers"):
        patch_model(m, W, alloc(["FFFF"] * (LAYERS + 1)))
    with pytest.raises(AllocationError, match="KV heads"):
        patch_model(m, W, alloc(["FF"] * LAYERS))
    with pytest.raises(AllocationError, match="window"):
        patch_model(m, W, alloc(MIXED, window=W + 1))
    state = patch_model(m, W)
    assert isinstance(state, HybridAttentionState)
    assert (state.window, state.num_layers, state.num_kv_heads, state.num_q_per_kv) == (W, LAYERS, KVH, QH // KVH)
    with pytest.raises(ValueError, match="shape"):
        state.set_gates(torch.ones(LAYERS, KVH + 1))
    with pytest.raises(ValueError, match="window"):
        patch_model(m, 0)


@torch.no_grad()
def test_mistral_all_s_equals_hf_global_window(tmp_path):
    """Mistral's global ``sliding_window`` is HF's all-S oracle; the patch also overrides it."""
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=32, sliding_window=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    oracle = load(tmp_path, sliding_window=W)
    m = load(tmp_path, sliding_window=W)  # native window on; the allocation takes over
    x = ids(t=90)
    patch_model(m, W, alloc(["SSSS"] * 2))
    assert maxdiff(m(x).logits, oracle(x).logits) < 1e-5
    m.consa_state.set_allocation(None)  # all-F: dense, although the config had a window
    assert maxdiff(m(x).logits, load(tmp_path)(x).logits) < 1e-5
    assert maxdiff(oracle(x).logits, load(tmp_path)(x).logits) > 1e-2
    m.consa_state.disable()
    assert m.config.sliding_window == W
