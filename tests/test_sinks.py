"""Attention sinks: S heads see keys 0..sink-1 and i-W+1..i (allocation field ``sink``).

The format (strict, optional, byte-identical files without it), ``consa-vllm make/show``, the KV
estimator against a brute-force count of kept tokens and blocks, the reference attention against
a dense masked softmax (binary and gated, sink 1/4/16, sequences far longer than sink + W, padding
and decode shapes), the patched HF model, the trainer with ``--sink`` end to end (stage 1, then
stage 2 from the file) and ``consa-vllm eval``. CPU only, no vLLM engine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consa_vllm.allocation import Allocation, AllocationError, ModelShape, estimate_kv, make_allocation
from consa_vllm.allocation.memory import tokens_kept
from consa_vllm.cli import main as cli_main
from consa_vllm.reference import hybrid_attention, patch_model, sliding_attention
from consa_vllm.tiny import build_tiny_model, stdlib_python_files

torch.set_num_threads(1)  # the CI box has 2 shared cores
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BASE = dict(granularity="kv_head", window=8, pattern=["FS", "SS"])


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("value,got", [(-1, "must be >= 0, got -1"), (1.5, "got 1.5 (a number with a fraction or exponent)"),
                                       (4.0, "got 4.0 (a number with a fraction or exponent)"),
                                       ("4", 'got "4" (a string)'), (True, "got true (a boolean)"), (None, "got null"),
                                       (2**31, "got 2147483648")])
def test_bad_sink_is_one_message_naming_file_and_field(tmp_path, value, got):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({**BASE, "sink": value}))
    with pytest.raises(AllocationError) as e:
        Allocation.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid allocation: field 'sink': ") and msg.endswith(got), msg
    assert "\n" not in msg and msg.count("field '") == 1


def test_sink_defaults_to_zero_and_old_files_are_byte_identical(tmp_path):
    a = Allocation.from_dict(BASE)
    assert a.sink == 0 and "sink" not in a.to_dict() and '"sink"' not in a.to_json()
    # Every allocation file committed before sinks existed reads as sink 0 and writes back unchanged.
    files = sorted((REPO / "benchmarks/testbed/results/allocations").glob("*.json"))
    assert len(files) >= 10
    for f in files:
        loaded = Allocation.load(f)
        assert loaded.sink == 0 and loaded.to_json() == f.read_text(), f
    # an explicit 0 means the same as no field
    assert Allocation.from_dict({**BASE, "sink": 0}) == a


def test_sink_round_trip_and_position_in_file(tmp_path):
    a = Allocation.from_dict({**BASE, "sink": 64, "rule": "hand"})
    text = a.save(tmp_path / "a.json").read_text()
    assert '"window": 8,\n  "sink": 64,\n  "pattern": [' in text  # beside the window, before the pattern
    b = Allocation.load(tmp_path / "a.json")
    assert b == a and b.sink == 64 and b.model_extra == {"rule": "hand"}
    assert b.with_extra(note="x").sink == 64
    assert make_allocation("bottom", 0.5, 2, 2, window=8, sink=16).sink == 16
    with pytest.raises(AllocationError, match="field 'sink'"):
        make_allocation("bottom", 0.5, 2, 2, window=8, sink=-1)


# --------------------------------------------------------------------------- make / show


def test_make_and_show_say_the_sink(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert cli_main(["make", "--rule", "bottom", "--sparsity", "0.5", "--layers", "2", "--kv-heads", "2",
                     "--window", "8", "--sink", "4", "--out", str(out), "--png", str(tmp_path / "a.png")]) == 0
    assert Allocation.load(out).sink == 4
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli_main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "window=8 sink=4 " in text.splitlines()[0]
    assert "S heads: sink 4 + window 8: query i sees keys 0..3 and keys i-7..i" in text
    assert "\nsink:" not in text  # not repeated among the extra fields
    assert cli_main(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["allocation"]["sink"] == 4 and shown["summary"]["sink"] == 4
    # no sink: said too
    Allocation.from_dict(BASE).save(tmp_path / "b.json")
    assert cli_main(["show", str(tmp_path / "b.json")]) == 0
    assert "S heads: window 8, no sink: query i sees keys i-7..i" in capsys.readouterr().out


@pytest.mark.parametrize("value,phrase", [("-1", "must be >= 0, got -1"),
                                          ("1.5", "expected a whole number (tokens), got '1.5'"),
                                          ("x", "expected a whole number (tokens), got 'x'")])
def test_make_bad_sink(tmp_path, capsys, value, phrase):
    out = tmp_path / "a.json"
    with pytest.raises(SystemExit) as e:
        cli_main(["make", "--rule", "bottom", "--sparsity", "0.5", "--layers", "2", "--kv-heads", "2",
                  "--window", "8", "--sink", value, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sink" in err and phrase in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- KV estimator


def _kept_brute_force(n: int, window: int, sink: int, block: int | None) -> int:
    """The tokens an S head needs after ``n`` tokens, or the whole blocks holding them."""
    kept = set(range(min(sink, n))) | set(range(max(0, n - window), n))
    return len(kept) if block is None else len({t // block for t in kept}) * block


def test_tokens_kept_with_sinks_against_brute_force():
    for window in (1, 5, 16):
        for sink in (0, 1, 4, 16, 17):
            for block in (None, 1, 4, 16):
                for n in range(0, 80):
                    got = tokens_kept(n, window, block, sink=sink)
                    assert got == _kept_brute_force(n, window, sink, block), (n, window, sink, block)
                    if block is not None:  # the served S pool's bound, in blocks
                        assert got // block <= math.ceil(sink / block) + math.ceil(window / block) + 1
    assert tokens_kept(10_000, 256, None, sink=64) == 320
    assert tokens_kept(10_000, 256, 16, sink=64) == 16 * (4 + 16)  # window on block boundaries
    assert tokens_kept(10_001, 256, 16, sink=64) == 16 * (4 + 16 + 1)  # window straddles 17 blocks
    assert tokens_kept(10_000, None, 16, sink=64) == 10_000  # F heads ignore the sink


def test_estimate_kv_counts_sink_plus_window():
    shape = ModelShape(num_layers=2, num_kv_heads=2, num_attention_heads=4, head_dim=32)
    per_token_head = 2 * 32 * 2  # K and V, bf16
    plain = Allocation.from_dict(BASE)  # 1 F head, 3 S heads
    sinks = Allocation.from_dict({**BASE, "sink": 4})
    for n in (5, 12, 100):
        e0, e4 = estimate_kv(plain, shape, n), estimate_kv(sinks, shape, n)
        assert e0.bytes_per_sequence == per_token_head * (n + 3 * min(n, 8))
        assert e4.bytes_per_sequence == per_token_head * (n + 3 * min(n, 12))
        assert e4.dense_bytes_per_sequence == per_token_head * 4 * n
    assert estimate_kv(sinks, shape, 100, block_size=4).bytes_per_sequence == per_token_head * (100 + 3 * 12)


# --------------------------------------------------------------------------- reference attention


def dense_reference(q, k, v, full, window, sink, starts=None, z=None):
    """Masked softmax over every key, one query head at a time (float64), no SDPA and no chunking.

    ``full[h]``: KV head h is F. ``starts[b]``: row b's first real slot (left padding). Query i
    (slot) of an S head sees its row's tokens 0..sink-1 and slots i-W+1..i. With ``z`` (per KV
    head), the output is z*F + (1-z)*S for every head.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    qi = torch.arange(tk - tq, tk)[:, None]
    kj = torch.arange(tk)[None, :]
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for row in range(b):
        start = 0 if starts is None else starts[row]
        causal = (kj <= qi) & (kj >= start)
        sliding = causal & ((kj > qi - window) | (kj - start < sink))
        for j in range(hq):
            scores = (q[row, j].double() @ k[row, j // g].double().T) * d ** -0.5

            def attend(allowed):
                p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
                return p @ v[row, j // g].double()

            if z is not None:
                zz = float(z[j // g])
                out[row, j] = zz * attend(causal) + (1 - zz) * attend(sliding)
            else:
                out[row, j] = attend(causal if full[j // g] else sliding)
    return out


def _qkv(b=2, hq=8, hkv=4, t=300, d=16, seed=0, tq=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq or t, d, generator=g)
    k, v = (torch.randn(b, hkv, t, d, generator=g) for _ in range(2))
    return q, k, v


def _padding_mask(t, starts):
    real = torch.ones(len(starts), t, dtype=torch.bool)
    for row, s in enumerate(starts):
        real[row, :s] = False
    return torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None] & real[:, None, None, :], real


W = 20


@pytest.mark.parametrize("sink", [1, 4, 16])
@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_binary_mode_equals_dense_masked_softmax(sink, backend):
    q, k, v = _qkv(t=300)  # 300 tokens >> sink + W (at most 36)
    full = [True, False, False, True]
    got = hybrid_attention(q, k, v, None, 16 ** -0.5, W, full_kv_heads=[0, 3], swa_backend=backend, chunk=32,
                           sink=sink)
    assert (got.double() - dense_reference(q, k, v, full, W, sink)).abs().max() < 1e-5
    all_s = hybrid_attention(q, k, v, None, 16 ** -0.5, W, full_kv_heads=[], swa_backend=backend, chunk=32,
                             sink=sink)
    assert (all_s.double() - dense_reference(q, k, v, [False] * 4, W, sink)).abs().max() < 1e-5
    # the sinks change the result (the test would not notice a dropped sink otherwise)
    no_sink = hybrid_attention(q, k, v, None, 16 ** -0.5, W, full_kv_heads=[], swa_backend=backend, chunk=32)
    assert (no_sink - all_s)[:, :, sink + W:].abs().max() > 1e-2


@pytest.mark.parametrize("sink", [1, 4, 16])
@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_gated_mode_equals_dense_mix(sink, backend):
    q, k, v = _qkv(t=260)
    z = torch.tensor([0.0, 0.3, 0.8, 1.0])
    got = hybrid_attention(q, k, v, None, 16 ** -0.5, W, gates=z, swa_backend=backend, chunk=32, sink=sink)
    want = dense_reference(q, k, v, None, W, sink, z=z)
    assert (got.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("sink", [1, 4, 16])
@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_left_padding_moves_the_sinks_with_the_row(sink, backend):
    q, k, v = _qkv(t=200)
    starts = [0, 37]
    mask, real = _padding_mask(200, starts)
    full = [False, True, False, False]
    got = hybrid_attention(q, k, v, mask, 16 ** -0.5, W, full_kv_heads=[1], swa_backend=backend, chunk=32, sink=sink)
    want = dense_reference(q, k, v, full, W, sink, starts=starts)
    keep = real[:, None, :, None].expand_as(got)
    assert (got.double() - want)[keep].abs().max() < 1e-5
    # an additive float mask (eager-style) gives the same
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    got_f = hybrid_attention(q, k, v, additive, 16 ** -0.5, W, full_kv_heads=[1], swa_backend=backend, chunk=32,
                             sink=sink)
    assert (got_f.double() - want)[keep].abs().max() < 1e-5


@pytest.mark.parametrize("sink", [1, 4, 16])
def test_decode_and_cached_prefill_shapes(sink):
    # queries are the last Tq of Tk slots (a KV cache): one decode step (no mask, as HF passes it) and
    # a chunk of 40 (with its causal mask: without one the reference takes Tq < Tk for a static cache)
    for tq in (1, 40):
        q, k, v = _qkv(hq=8, hkv=8, t=250, tq=tq, seed=tq)  # sliding_attention takes repeated K and V
        mask = None if tq == 1 else (torch.arange(250)[None, :] <= torch.arange(250 - tq, 250)[:, None])[None, None]
        for backend in ("sdpa", "chunked"):
            got = sliding_attention(q, k, v, mask, 16 ** -0.5, W, backend=backend, chunk=16, sink=sink)
            want = dense_reference(q, k, v, [False] * 8, W, sink)
            assert (got.double() - want).abs().max() < 1e-5, (tq, backend)


# --------------------------------------------------------------------------- patched HF model


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("sink-lm")
    build_tiny_model(d, family="qwen3", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32,
                     hidden_size=64, intermediate_size=128, tokenizer=False)
    return d


def _lm(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@torch.no_grad()
def test_patched_model_takes_the_allocations_sink(tiny_lm):
    alloc = Allocation(granularity="kv_head", window=8, sink=4, pattern=["SF", "SS"])
    m = _lm(tiny_lm)
    state = patch_model(m, window=8, allocation=alloc)
    assert state.sink == 4
    x = torch.randint(1, 512, (1, 90), generator=torch.Generator().manual_seed(0))
    with_sink = m(x).logits
    # left-padded batch: the padded row equals the row alone (its sinks are its first real tokens)
    pad = 23
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), x[:, :67]], dim=1)
    batch = torch.cat([x, ids])
    attn = torch.ones_like(batch)
    attn[1, :pad] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    got = m(batch, attention_mask=attn, position_ids=pos).logits
    assert (got[0] - with_sink[0]).abs().max() < 1e-5
    assert (got[1, pad:] - m(x[:, :67]).logits[0]).abs().max() < 1e-5
    # greedy decoding with the KV cache (one query at a time) agrees with one full forward
    gen = m.generate(x[:, :50], max_new_tokens=12, do_sample=False, output_logits=True,
                     return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    step_logits = torch.stack(gen.logits, dim=1)[0]
    full_logits = m(gen.sequences).logits[0, 49:-1]
    assert (step_logits - full_logits).abs().max() < 1e-4
    # sink 0 is a different model on long inputs
    patch_model(m, window=8, allocation=Allocation(granularity="kv_head", window=8, pattern=["SF", "SS"]))
    assert (m(x).logits - with_sink)[0, 20:].abs().max() > 1e-3


def test_patched_sink_must_match_the_allocation(tiny_lm):
    m = _lm(tiny_lm)
    state = patch_model(m, window=8, sink=4)
    with pytest.raises(AllocationError, match="allocation sink 0 differs from the patched sink 4"):
        state.set_allocation(Allocation.from_dict(BASE))
    state.set_allocation(Allocation.from_dict({**BASE, "sink": 4}))
    with pytest.raises(ValueError, match="sink must be a whole number of tokens >= 0, got -1"):
        patch_model(m, window=8, sink=-1)


# --------------------------------------------------------------------------- trainer, stage 2, eval


def train_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "consa_vllm.train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sink-train")
    model = build_tiny_model(root / "model", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in stdlib_python_files(6)))
    return root, model, data


def test_trainer_with_sink_end_to_end(tiny_run, tmp_path):
    root, model, data = tiny_run
    out = tmp_path / "alloc.json"
    common = ("--model", model, "--data", data, "--seq-len", 64, "--window", 8, "--batch-size", 2,
              "--freeze-weights", "--target-sparsity", 0.5, "--checkpoint-every", 0, "--no-progress")
    r = train_cli(*common, "--steps", 200, "--sink", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    a = Allocation.load(out)
    assert (a.sink, a.window, a.sparsity) == (4, 8, 0.5)
    assert a.training["args"]["sink"] == 4
    # the gates learned: they left their common start and reached the target sparsity
    la = torch.tensor(a.training["log_alpha"])
    assert (la - 3.0).abs().min() > 0.05 and la.std() > 0.05, la
    assert abs(a.training["expected_sparsity"] - 0.5) < 0.02
    # the gates mix full attention with sink + window attention: with the gates started mostly closed
    # (S dominant), the first step's loss (same data, same noise, nothing updated yet) depends on the sink
    first = {}
    for sink in (0, 4):
        name = f"closed{sink}"
        rc = train_cli(*common, "--steps", 1, "--init-log-alpha", -3, "--sink", sink, "--out", tmp_path / f"{name}.json")
        assert rc.returncode == 0, rc.stderr
        first[sink] = json.loads((tmp_path / f"{name}.logs" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first[4] - first[0]) > 1e-3, first

    # stage 2 from the file: the sink comes from the allocation, whatever --sink says
    trained = tmp_path / "trained"
    r2 = train_cli("--model", model, "--data", data, "--seq-len", 64, "--batch-size", 2, "--lr", 1e-3,
                   "--allocation", out, "--stage2-steps", 2, "--save-model", trained, "--sink", 9,
                   "--out", tmp_path / "s2.json", "--checkpoint-every", 0, "--no-progress")
    assert r2.returncode == 0, r2.stderr
    assert Allocation.load(tmp_path / "s2.json").sink == 4
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["consa"]["sink"] == 4 and cfg["consa"]["window"] == 8  # the export embeds the field

    # eval on the exported model: the reference runs with the sink, the report and KV estimate say it
    rep = tmp_path / "eval.json"
    r3 = subprocess.run([sys.executable, "-m", "consa_vllm.eval", "--model", str(trained), "--contexts", "96",
                         "--depths", "0", "0.5", "--samples", "2", "--tasks", "passkey", "--out", str(rep)],
                        capture_output=True, text=True, timeout=600, env=ENV)
    assert r3.returncode == 0, r3.stderr
    report = json.loads(rep.read_text())
    assert report["sink"] == 4 and report["allocation"]["sink"] == 4
    shape = ModelShape.from_model_dir(trained)
    assert report["kv"][0]["bytes_per_sequence"] == estimate_kv(a, shape, 96).bytes_per_sequence
    assert estimate_kv(a, shape, 96).bytes_per_sequence > estimate_kv(
        Allocation(granularity=a.granularity, window=8, pattern=a.pattern), shape, 96).bytes_per_sequence


def test_trainer_bad_sink(tiny_run, tmp_path):
    _, model, data = tiny_run
    r = train_cli("--model", model, "--data", data, "--sink", -3, "--out", tmp_path / "o" / "a.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--sink must be a whole number of tokens in 0..2147483647, got -3" in r.stderr
    assert not (tmp_path / "o").exists()


def test_retrieval_needle_in_the_sink_is_within_reach():
    from consa_vllm.eval.tasks import Sample

    def sample(needle_at, sink):
        return Sample(task="t", prompt_ids=[0] * 100, answer_ids=[1], answer="a", context=100, depth=0.0,
                      distance=99 - needle_at, window=16, sink=sink)

    assert sample(0, 0).beyond_window and sample(3, 3).beyond_window
    assert not sample(0, 1).beyond_window and not sample(3, 4).beyond_window
    assert not sample(90, 0).beyond_window  # inside the window
