"""CPU-sized evidence: a learned kv_head allocation beats seeded random ones at equal sparsity.

What runs, all on CPU, one thread, deterministic:

1. a tiny Qwen3-shaped model (4 layers, 4 query / 2 KV heads, head_dim 32, hidden 64) is
   pretrained here (``benchmarks.testbed.lm.train_lm``, 300 steps) on symbolic key-value
   documents (:func:`consa_vllm.eval.tasks.training_document`): one-token needles ``k3v5`` in
   the first half of a 64-token sequence, queries ``? k3`` -> ``v5`` at least 2 x window
   (16 tokens) later; window W = 8;
2. the project's trainer (``consa_vllm.train.train``, masks-only calibration, global
   constraint, rho = 0.75: 6 of 8 KV heads S) learns the allocation on the same kind of data,
   written as text files it reads;
3. retrieval accuracy (``consa_vllm.eval.metrics.score_retrieval``, reference attention) on
   300 held-out prompts with 3 distractor needles, every needle beyond the window, for dense,
   the learned allocation and ``make_allocation("random", 0.75, ...)`` with seeds 0..5.

Measured with this file (``CONSA_EVIDENCE_SEEDS=0,1,2,3,4``, and ``CONSA_EVIDENCE_RHO=0.5``
for the second table; seed = model and data seed; random = the 6 random allocations; chance
is 1/8; 300 prompts, so a standard error of about 0.03):

rho = 0.75 (asserted)::

    seed  dense  learned  random mean  random max  learned pattern
    0     0.993  0.993    0.152        0.380       FF SS SS SS
    1     1.000  1.000    0.072        0.100       SF FS SS SS
    2     0.997  0.940    0.245        0.917       FS SF SS SS
    3     1.000  1.000    0.249        0.827       FF SS SS SS
    4     0.993  0.993    0.149        0.317       FF SS SS SS

rho = 0.5 (not asserted: random allocations keep the retrieving heads far more often)::

    seed  dense  learned  random mean  random max
    0     0.993  0.993    0.380        0.500
    1     1.000  0.997    0.231        0.997
    2     0.997  0.957    0.677        0.967
    3     1.000  1.000    0.625        0.833
    4     0.993  0.993    0.351        0.740

At rho 0.75 the smallest gap learned - random mean was 0.695 and the smallest learned / dense
0.943. The test runs seed 0 and asserts a gap of at least 0.4 and learned >= 0.85 x dense:
far above the sampling noise, below every measured run. It is not a law: in a prototype
of this pipeline (same sizes, another data order) the trainer kept only one of the two
heads that retrieve (learned 0.42, random mean 0.17, dense 1.0), because masks-only
calibration minimises the LM loss of the whole sequence, not retrieval alone. A random
allocation can be lucky too (it keeps the heads that retrieve), so no per-seed bound is
asserted.
Runtime: 50 s per seed on a quiet 2-core machine, 90-140 s under load.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from benchmarks.testbed.lm import build_model, train_lm
from consa_vllm.allocation import make_allocation
from consa_vllm.eval.metrics import score_retrieval
from consa_vllm.eval.tasks import (Filler, build_word_tokenizer, make_samples, symbolic_filler, symbolic_task,
                                   symbolic_vocab, training_document)

T, W = 64, 8
RHO = float(os.environ.get("CONSA_EVIDENCE_RHO", "0.75"))
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
PRETRAIN_STEPS, CALIBRATION_STEPS, RANDOM_SEEDS = 300, 300, range(6)
MIN_GAP, MIN_VS_DENSE = 0.4, 0.85
SEEDS = [int(s) for s in os.environ.get("CONSA_EVIDENCE_SEEDS", "0").split(",")]


def run_evidence(seed: int, root: Path) -> dict:
    """The whole pipeline for one model/data seed; returns the accuracies."""
    from transformers import AutoModelForCausalLM

    from consa_vllm.reference import patch_model
    from consa_vllm.train import TrainConfig, train

    t0 = time.time()
    v = symbolic_vocab(8, 8, 4)
    tok = build_word_tokenizer(v["keys"] + v["values"] + v["needles"] + v["filler"])
    task = symbolic_task(8, 8)
    filler = Filler(tok, [symbolic_filler(v["filler"], 4000, seed)])

    def docs(n: int, key: str) -> list[tuple[list[int], list[bool]]]:
        # T - 1 tokens + EOS: the trainer packs documents EOS-separated into T-token rows,
        # so each of its rows is exactly one document, as in pretraining.
        rng = random.Random(f"{seed}/{key}")
        out = []
        for _ in range(n):
            ids, mask = training_document(task, tok, filler, T - 1, rng, num_needles=6, min_distance=2 * W,
                                          max_filler_gap=2)
            out.append((ids + [tok.eos_token_id], mask + [False]))
        return out

    pre = docs(32 * PRETRAIN_STEPS // 4, "pretrain")

    def batch(step: int):
        rng = random.Random(f"{seed}/batch/{step}")
        rows = [pre[rng.randrange(len(pre))] for _ in range(32)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    model = build_model({**SHAPE, "vocab_size": len(tok)}, seed)
    train_lm(model, batch, PRETRAIN_STEPS, 3e-3, warmup=20, answer_weight=5.0)
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    t_pre = time.time() - t0

    data = root / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(tok.convert_ids_to_tokens(ids[:-1]))}) + "\n"
                            for ids, _ in docs(CALIBRATION_STEPS * 4, "calibration")))
    learned = train(TrainConfig(model=str(model_dir), data=[str(data)], seq_len=T, steps=CALIBRATION_STEPS,
                                batch_size=16, target_sparsity=RHO, granularity="kv_head", constraint="global",
                                window=W, freeze_weights=True, gate_lr=0.05, lagrangian_lr=0.1,
                                out=str(root / "learned.json"), progress=False, checkpoint_every=0, seed=seed,
                                device="cpu"))
    t_cal = time.time() - t0 - t_pre

    prompts = make_samples([symbolic_task(8, 8, distractors=3)], tok, filler, [T], [0.0, 0.2, 0.4], 100,
                           seed=1000 + seed, window=W)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    state = patch_model(hf, window=W)

    def accuracy(alloc) -> float:
        state.set_allocation(alloc)
        ok = score_retrieval(hf, prompts, batch_size=100)
        return sum(ok) / len(ok)

    rand = [accuracy(make_allocation("random", RHO, 4, 2, W, seed=s)) for s in RANDOM_SEEDS]
    # Deterministic rules, for the record only (not asserted: one fixed pattern each).
    rules = {r: accuracy(make_allocation(r, RHO, 4, 2, W)) for r in ("interleave", "bottom", "middle", "top")}
    return {"seed": seed, "dense": accuracy(None), "learned": accuracy(learned), "pattern": learned.pattern,
            "rules": rules,
            "random": rand, "random_mean": sum(rand) / len(rand), "beyond_window": all(p.beyond_window for p in prompts),
            "learned_sparsity": learned.sparsity, "seconds_pretrain": t_pre, "seconds_calibration": t_cal,
            "seconds": time.time() - t0}


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: bitwise-repeatable reductions
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_learned_kv_head_allocation_beats_seeded_random_on_retrieval(seed, tmp_path, deterministic):
    r = run_evidence(seed, tmp_path)
    print("\nevidence:", json.dumps(r))
    assert r["beyond_window"] and r["learned_sparsity"] == RHO
    assert r["dense"] >= 0.9, f"the pretrained model did not learn retrieval: {r}"
    assert r["learned"] >= MIN_VS_DENSE * r["dense"], r
    assert r["learned"] - r["random_mean"] >= MIN_GAP, r
