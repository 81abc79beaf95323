"""Allocation file format, rule-based generators and the KV estimator (CPU, no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from consa_vllm.allocation import (
    RULES,
    Allocation,
    AllocationError,
    ModelShape,
    estimate_kv,
    make_allocation,
    render_text,
    summarize,
)


def _valid(**over):
    d = {"consa_version": 1, "granularity": "kv_head", "window": 64, "pattern": ["SSFF", "FSSF", "FFFF"]}
    d.update(over)
    return d


def _write(tmp_path: Path, data, name="a.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# ----------------------------------------------------------------------------- round trip


def test_round_trip_keeps_pattern_and_extra_fields(tmp_path):
    a = Allocation.from_dict(_valid(target_sparsity=0.25, losses={"task": [1.5, 1.2]}))
    p = a.save(tmp_path / "sub" / "alloc.json")
    b = Allocation.load(p)
    assert b == a
    assert b.pattern == ["SSFF", "FSSF", "FFFF"]
    assert b.to_dict()["losses"] == {"task": [1.5, 1.2]}
    assert (b.num_layers, b.num_kv_heads, b.num_units) == (3, 4, 12)
    assert b.sparsity == pytest.approx(4 / 12)
    # Human-readable: one pattern row per line.
    text = p.read_text()
    assert '    "SSFF",\n' in text and json.loads(text)["window"] == 64


def test_accessors():
    a = Allocation.from_dict(_valid())
    assert a.full_heads(0) == [2, 3] and a.sliding_heads(0) == [0, 1]
    assert a.is_full(1, 0) and not a.is_full(1, 1)
    assert a.mask()[0] == [False, False, True, True]
    s = summarize(a)
    assert s["full_heads_per_layer"] == [2, 2, 4]
    assert s["all_full_layers"] == [2] and s["all_sliding_layers"] == []
    assert "layer 2  FFFF  4F/0S" in render_text(a)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "data, field, phrase",
    [
        (_valid(pattern=["SSFX", "FFFF", "FFFF"]), "pattern", "invalid character(s) 'X'"),
        (_valid(pattern=["ssff", "FFFF", "FFFF"]), "pattern", "invalid character"),
        (_valid(window=0), "window", "window must be >= 1, got 0"),
        (_valid(window=-5), "window", "window must be >= 1"),
        (_valid(granularity="layer", pattern=["SSSS", "FSSF"]), "pattern", "layer 1 ('FSSF') mixes F and S"),
        (_valid(pattern=["SSFF", "FF"]), "pattern", "layer 1 has 2 KV heads but layer 0 has 4"),
        (_valid(pattern=[]), "pattern", "pattern is empty"),
        (_valid(granularity="head"), "granularity", "'layer' or 'kv_head'"),
        (_valid(consa_version=2), "consa_version", "got 2"),
    ],
)
def test_each_validation_error_names_file_and_field(tmp_path, data, field, phrase):
    p = _write(tmp_path, data)
    with pytest.raises(AllocationError) as ei:
        Allocation.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ")
    assert phrase in msg
    if field:
        assert f"field '{field}'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("missing", ["granularity", "window", "pattern"])
def test_missing_field(tmp_path, missing):
    d = _valid()
    del d[missing]
    with pytest.raises(AllocationError, match=rf"field '{missing}': required field is missing"):
        Allocation.load(_write(tmp_path, d))


def test_file_not_found(tmp_path):
    with pytest.raises(AllocationError, match=r"nope\.json: allocation file not found"):
        Allocation.load(tmp_path / "nope.json")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(AllocationError, match="is a directory"):
        Allocation.load(tmp_path)


def test_not_json(tmp_path):
    p = _write(tmp_path, '{"granularity": "kv_head", "window": 4,')
    with pytest.raises(AllocationError, match=r"a\.json: not valid JSON \(.* at line 1 column \d+\)"):
        Allocation.load(p)


def test_not_an_object(tmp_path):
    """JSON's own type names in the message, not Python's ('list', 'NoneType')."""
    with pytest.raises(AllocationError, match=r'a\.json: expected a JSON object, got \["SSFF"\] \(an array\)$'):
        Allocation.load(_write(tmp_path, ["SSFF"]))
    with pytest.raises(AllocationError, match=r"a\.json: expected a JSON object, got null$"):
        Allocation.load(_write(tmp_path, None))


def test_check_model_wrong_layer_count():
    a = Allocation.from_dict(_valid())
    with pytest.raises(AllocationError,
                       match=r"^a\.json: pattern has 3 layers but the model has 28 \(num_hidden_layers\)$"):
        a.check_model(28, 4, source="a.json")


def test_check_model_wrong_head_count():
    a = Allocation.from_dict(_valid())
    with pytest.raises(AllocationError,
                       match=r"pattern has 4 KV heads per layer but the model has 8 \(num_key_value_heads\)"):
        a.check_model(3, 8)
    a.check_model(3, 4)  # fits


def test_frozen():
    a = Allocation.from_dict(_valid())
    with pytest.raises(Exception):
        a.window = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- atomic save


def test_save_leaves_no_temp_files(tmp_path):
    a = Allocation.from_dict(_valid())
    for _ in range(3):
        a.save(tmp_path / "a.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch):
    old = Allocation.from_dict(_valid())
    p = old.save(tmp_path / "a.json")
    before = p.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", boom)
    new = Allocation.from_dict(_valid(pattern=["FFFF", "FFFF", "FFFF"]))
    with pytest.raises(OSError, match="disk pulled out"):
        new.save(p)
    assert p.read_bytes() == before  # old file intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]  # no temp left behind
    monkeypatch.undo()
    assert Allocation.load(p) == old


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Allocation.from_dict(_valid()).save(tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- generators

SHAPES = [(28, 8), (4, 2), (12, 4)]


def _layer_rhos(L):
    return sorted({k / L for k in range(L + 1)})


@pytest.mark.parametrize("rule", [r for r in RULES if r != "uniform"])
@pytest.mark.parametrize("L,H", SHAPES)
def test_generators_hit_rho_exactly_layer_granularity(rule, L, H):
    for rho in _layer_rhos(L):
        a = make_allocation(rule, rho, L, H, window=16, granularity="layer", seed=3)
        assert a.granularity == "layer"
        assert (a.num_layers, a.num_kv_heads) == (L, H)
        assert sum(row == "S" * H for row in a.pattern) == round(rho * L)
        assert a.sparsity == pytest.approx(rho, abs=1e-12)
        assert all(len(set(row)) == 1 for row in a.pattern)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("L,H", SHAPES)
def test_generators_hit_rho_exactly_kv_head_granularity(rule, L, H):
    n = L * H
    rhos = [k / H for k in range(H + 1)] if rule == "uniform" else [k / n for k in range(0, n + 1, max(1, n // 16))]
    for rho in rhos:
        a = make_allocation(rule, rho, L, H, window=16, granularity="kv_head", seed=3)
        n_s = sum(row.count("S") for row in a.pattern)
        assert n_s == round(rho * n), (rule, rho)
        assert a.sparsity == pytest.approx(rho, abs=1e-12)
        assert a.to_dict()["target_sparsity"] == rho


def test_paper_shape_rho_values():
    # Qwen3-0.6B/1.7B shape: 28 layers x 8 KV heads, rho in {0.25, 0.5, 0.75} at both granularities.
    for rho in (0.25, 0.5, 0.75):
        for rule in ("bottom", "middle", "interleave", "random", "uniform"):
            assert make_allocation(rule, rho, 28, 8, 4096).sparsity == rho
        for rule in ("bottom", "top", "middle", "interleave", "random"):
            assert make_allocation(rule, rho, 28, 8, 4096, granularity="layer").sparsity == rho


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(rule="bottom", sparsity=0.3, num_layers=4, num_kv_heads=2, granularity="kv_head"),
         "sparsity 0.3 cannot be met exactly with 8 KV heads (it needs 2.4 S KV heads); nearest exact values: 0.25 or 0.375"),
        (dict(rule="bottom", sparsity=0.5, num_layers=3, num_kv_heads=2, granularity="layer"),
         "cannot be met exactly with 3 layers"),
        (dict(rule="uniform", sparsity=0.5, num_layers=4, num_kv_heads=3, granularity="kv_head"),
         "cannot be met exactly with 3 KV heads per layer"),
        (dict(rule="uniform", sparsity=0.5, num_layers=4, num_kv_heads=2, granularity="layer"),
         "rule 'uniform' needs granularity 'kv_head'"),
        (dict(rule="bottom", sparsity=1.5, num_layers=4, num_kv_heads=2), "sparsity must be in [0, 1], got 1.5"),
        (dict(rule="bottom", sparsity=-0.1, num_layers=4, num_kv_heads=2), "sparsity must be in [0, 1]"),
        (dict(rule="sideways", sparsity=0.5, num_layers=4, num_kv_heads=2), "unknown rule 'sideways'"),
        (dict(rule="bottom", sparsity=0.5, num_layers=0, num_kv_heads=2), "model shape must be positive"),
    ],
)
def test_generators_refuse_impossible_requests(kwargs, phrase):
    kwargs.setdefault("window", 16)
    with pytest.raises(ValueError) as ei:
        make_allocation(**kwargs)
    assert phrase in str(ei.value)


def test_generator_window_validated():
    with pytest.raises(AllocationError, match="field 'window': window must be >= 1, got 0"):
        make_allocation("bottom", 0.5, 4, 2, window=0)


def test_bottom_and_top_are_placed_where_named():
    a = make_allocation("bottom", 0.5, 4, 2, 16, granularity="layer")
    assert a.pattern == ["SS", "SS", "FF", "FF"]
    a = make_allocation("top", 0.5, 4, 2, 16, granularity="layer")
    assert a.pattern == ["FF", "FF", "SS", "SS"]
    a = make_allocation("bottom", 0.375, 4, 2, 16)
    assert a.pattern == ["SS", "SF", "FF", "FF"]


def test_uniform_same_f_count_per_layer():
    for seed in range(5):
        a = make_allocation("uniform", 0.75, 28, 8, 4096, seed=seed)
        assert {row.count("F") for row in a.pattern} == {2}
    # Different layers may pick different heads.
    a = make_allocation("uniform", 0.5, 28, 8, 4096, seed=0)
    assert len(set(a.pattern)) > 1


def _is_contiguous(bits):
    idx = [i for i, b in enumerate(bits) if b]
    return not idx or idx == list(range(idx[0], idx[-1] + 1))


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_middle_gives_contiguous_f_block(granularity):
    L, H = 28, 8
    for rho in (0.25, 0.5, 0.75):
        a = make_allocation("middle", rho, L, H, 64, granularity=granularity)
        flat = "".join(a.pattern)  # layer-major unit order
        assert _is_contiguous([c == "F" for c in flat])
        f_units = [i for i, c in enumerate(flat) if c == "F"]
        # The block is centred: the S on each side differ by at most one unit/layer.
        unit = H if granularity == "layer" else 1
        left, right = f_units[0], len(flat) - 1 - f_units[-1]
        assert abs(left - right) <= unit
        assert a.pattern[0].count("F") == 0 and a.pattern[-1].count("F") == 0


@pytest.mark.parametrize("granularity, n", [("layer", 28), ("kv_head", 28 * 8)])
def test_interleave_evenly_spaced(granularity, n):
    for rho in (0.5, 0.75):
        a = make_allocation("interleave", rho, 28, 8, 64, granularity=granularity)
        flat = [row[0] for row in a.pattern] if granularity == "layer" else list("".join(a.pattern))
        f = [i for i, c in enumerate(flat) if c == "F"]
        gaps = {b - a_ for a_, b in zip(f, f[1:])}
        assert max(gaps) - min(gaps) <= 1  # evenly spaced
        assert f[-1] == len(flat) - 1  # the last unit is F (Gemma style: the top layer is global)
    a = make_allocation("interleave", 0.75, 8, 1, 64, granularity="layer")
    assert [r for r in a.pattern] == ["S", "S", "S", "F", "S", "S", "S", "F"]


def test_random_is_seeded_and_reproducible():
    a = make_allocation("random", 0.5, 28, 8, 64, seed=7)
    b = make_allocation("random", 0.5, 28, 8, 64, seed=7)
    c = make_allocation("random", 0.5, 28, 8, 64, seed=8)
    assert a == b
    assert a.pattern != c.pattern
    assert a.to_dict()["seed"] == 7
    # Not accidentally bottom/top.
    assert a.pattern != make_allocation("bottom", 0.5, 28, 8, 64).pattern


def test_generated_allocations_round_trip(tmp_path):
    for rule in RULES:
        a = make_allocation(rule, 0.5, 4, 2, 32, seed=1)
        assert Allocation.load(a.save(tmp_path / f"{rule}.json")) == a


# ----------------------------------------------------------------------------- estimator

# 4 layers x 2 KV heads, head_dim 32; pattern SS/SS/FF/FF: 4 F and 4 S KV heads, W = 64.
SHAPE = ModelShape(num_layers=4, num_kv_heads=2, num_attention_heads=4, head_dim=32)
ALLOC = Allocation(granularity="kv_head", window=64, pattern=["SS", "SS", "FF", "FF"])


def test_estimator_closed_form_exact_tokens():
    # bf16: K and V, 32 values of 2 bytes each -> 128 bytes per token per KV head.
    est = estimate_kv(ALLOC, SHAPE, context=1000, dtype="bfloat16")
    assert est.bytes_per_sequence == 128 * (4 * 1000 + 4 * 64) == 544_768
    assert est.dense_bytes_per_sequence == 128 * 8 * 1000 == 1_024_000
    assert est.ratio_to_dense == pytest.approx(544_768 / 1_024_000)
    assert est.capacity_gain == pytest.approx(1_024_000 / 544_768)


def test_estimator_fp8_cache_is_one_byte_a_value():
    """--kv-cache-dtype fp8 / fp8_e4m3: half the bf16 bytes, ratio to dense unchanged."""
    bf16 = estimate_kv(ALLOC, SHAPE, context=1000, dtype="bfloat16", block_size=(16, 32))
    for name in ("fp8", "fp8_e4m3"):
        est = estimate_kv(ALLOC, SHAPE, context=1000, dtype=name, block_size=(16, 32))
        assert 2 * est.bytes_per_sequence == bf16.bytes_per_sequence
        assert 2 * est.dense_bytes_per_sequence == bf16.dense_bytes_per_sequence


def test_estimator_context_shorter_than_window_is_dense():
    est = estimate_kv(ALLOC, SHAPE, context=10, dtype="float32")
    assert est.bytes_per_sequence == est.dense_bytes_per_sequence == 2 * 32 * 4 * 8 * 10
    assert est.ratio_to_dense == 1.0


def test_estimator_closed_form_with_blocks():
    # Blocks of 32: F keeps ceil(1000/32) = 32 blocks = 1024 tokens; an S head keeps at most the
    # blocks its window i-63..i can touch: ceil(63/32) + 1 = 3 blocks = 96 tokens.
    est = estimate_kv(ALLOC, SHAPE, context=1000, dtype="bf16", block_size=32)
    assert est.bytes_per_sequence == 128 * (4 * 1024 + 4 * 96) == 573_440
    assert est.dense_bytes_per_sequence == 128 * 8 * 1024 == 1_048_576
    # Window 64 = 2 whole blocks, but a window that starts mid-block straddles 3.
    est = estimate_kv(ALLOC, SHAPE, context=64, dtype="bf16", block_size=16)
    assert est.bytes_per_sequence == est.dense_bytes_per_sequence == 128 * 8 * 64


def test_estimator_paper_shape():
    # Qwen3-0.6B shape, rho = 0.75, W = 4096, 16k context, bf16:
    # per KV head per token 2*128*2 = 512 bytes; 56 F heads x 16384 + 168 S heads x 4096.
    shape = ModelShape(28, 8, 16, 128)
    a = make_allocation("uniform", 0.75, 28, 8, 4096)
    est = estimate_kv(a, shape, 16384, dtype="bfloat16")
    assert est.bytes_per_sequence == 512 * (56 * 16384 + 168 * 4096)
    assert est.ratio_to_dense == pytest.approx((56 * 16384 + 168 * 4096) / (224 * 16384))  # 0.4375


def test_estimator_refuses_mismatched_shape_and_bad_input():
    with pytest.raises(AllocationError, match="num_hidden_layers"):
        estimate_kv(ALLOC, ModelShape(5, 2, 4, 32), 100)
    with pytest.raises(ValueError, match="unknown KV dtype 'int3'"):
        estimate_kv(ALLOC, SHAPE, 100, dtype="int3")
    with pytest.raises(ValueError, match="context must be >= 0"):
        estimate_kv(ALLOC, SHAPE, -1)


def test_model_shape_from_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
         "hidden_size": 1024}))
    assert ModelShape.from_model_dir(tmp_path) == ModelShape(28, 8, 16, 128)
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        ModelShape.from_model_dir(tmp_path / "missing")


# ----------------------------------------------------------------------------- heatmap


def _png_wh(path: Path) -> tuple[int, int]:
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_allocation_with_probabilities(tmp_path):
    from consa_vllm.allocation import plot_allocation

    a = make_allocation("uniform", 0.75, 8, 4, 64, seed=1)
    probs = [[0.9 if c == "F" else 0.2 for c in row] for row in a.pattern]
    one = plot_allocation(a, tmp_path / "one.png", title="t")
    two = plot_allocation(a, tmp_path / "sub" / "two.png", probabilities=probs)
    w1, h1 = _png_wh(one)
    w2, h2 = _png_wh(two)
    assert 300 < w1 < w2 < 4000 and 300 < h1 < 4000  # the second panel widens the figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "sub"]  # no temp files
    # Tiny and large shapes draw too.
    _png_wh(plot_allocation(Allocation(granularity="layer", window=1, pattern=["S"]), tmp_path / "1x1.png"))
    _png_wh(plot_allocation(make_allocation("middle", 0.5, 96, 16, 4096), tmp_path / "big.png"))


def test_plot_allocation_rejects_bad_probabilities(tmp_path):
    from consa_vllm.allocation import plot_allocation

    a = make_allocation("bottom", 0.5, 4, 2, 64)
    with pytest.raises(ValueError, match="probabilities must be 4 layers x 2 KV heads"):
        plot_allocation(a, tmp_path / "x.png", probabilities=[[0.5, 0.5]] * 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        plot_allocation(a, tmp_path / "x.png", probabilities=[[0.5, 1.5]] * 4)
    assert not (tmp_path / "x.png").exists()
