"""Learned vs rule-based allocations at equal KV memory, on a small model trained here.

One command, in phases that each write to ``--out DIR`` and skip finished work (so the run
fits the GPU machine's 10-minute commands; rerun the same command to continue)::

    python -m benchmarks.testbed.run --out DIR                 # every phase, H100 sizes
    python -m benchmarks.testbed.run --out DIR --phase pretrain --max-minutes 9
    python -m benchmarks.testbed.run --out DIR --smoke         # toy sizes, CPU, a few minutes

Phases:

1. ``corpus``: Python files of this interpreter's stdlib and site-packages (``corpus/manifest.json``
   records each file's path and SHA-256), a BPE tokenizer trained on them, token ids, and
   retrieval-rich training documents (key-value and passkey needles inserted in the code at
   controlled distances, :func:`consa_vllm.eval.tasks.training_document`).
2. ``pretrain``: a Qwen3-shaped model (8 layers, 16 query / 8 KV heads, head_dim 64, context
   2048), half plain code, half retrieval documents, bf16 autocast, HF SDPA attention.
3. ``allocations``: ConSA with the project's trainer (``python -m consa_vllm.train``,
   masks-only, the same data mix): kv_head per-layer, kv_head global, layer; at rho 0.5 and
   0.75. Rule-based: interleave, bottom, middle, seeded random with the same F count per
   layer (``uniform``); and dense.
4. ``stage2``: every allocation gets the same short weight training from the same pretrained
   checkpoint (same batches, steps, learning rate), saved as an exported checkpoint.
5. ``eval``: :func:`consa_vllm.eval.cli.evaluate` on each: held-out loss by distance beyond the
   window, passkey and key-value retrieval at several lengths and depths, KV estimate.
6. ``report``: ``results.json``, ``results.md`` (the table) and ``heatmaps/*.png``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..machine import machine_name
from .common import log, make_parser, open_run, phase_seconds, run_phases


class ResultRow(BaseModel):
    """One allocation's line of ``results.json`` (metrics of ``consa_vllm.eval`` after stage 2)."""

    name: str
    kind: str  # "dense", "consa" or "rule"
    rho: float
    granularity: str
    constraint: str | None
    pattern: list[str]
    retrieval: float
    retrieval_beyond_window: float | None
    retrieval_vs_dense: float | None = None
    passkey: float | None
    kv: float | None
    loss: float
    loss_beyond_window: float | None
    kv_ratio_to_dense: float | None
    kv_context: int | None


class RunResults(BaseModel):
    """``results.json``: the settings, the pretraining summary and one row per allocation."""

    settings: dict
    pretrain: dict
    corpus_files: int
    device: str
    # Wall seconds per phase, summed over the reruns that a time budget split it into.
    phase_seconds: dict[str, float]
    rows: list[ResultRow]


class Settings(BaseModel):
    """Every size of a run (``settings.json``). ``FULL`` is sized for one H100; ``SMOKE`` for a CPU check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_corpus_bytes: int = 240_000_000  # ~70 M tokens: pretraining sees its code about once
    heldout_per_mille: int = 20
    tokenizer_bytes: int = 30_000_000
    vocab_size: int = 8192
    shape: dict = Field(default_factory=lambda: dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=2048))
    seq_len: int = 2048
    window: int = 256
    rhos: tuple[float, ...] = (0.5, 0.75)
    retrieval_docs: int = 24_000
    kv_needles: int = 24
    retrieval_fraction: float = 0.5  # of each pretraining / stage-2 batch
    # pretraining
    pre_steps: int = 2000
    pre_batch: int = 32
    pre_lr: float = 1e-3
    pre_warmup: int = 100
    answer_weight: float = 1.0
    # ConSA stage 1 (masks-only, the project's trainer)
    consa_steps: int = 200
    consa_batch: int = 8
    consa_docs: int = 800  # x 2 rows: more than steps x batch, tokenized once per trainer run
    gate_lr: float = 0.05
    lagrangian_lr: float = 0.1
    # stage 2 (same for every allocation)
    s2_steps: int = 100
    s2_batch: int = 16
    s2_lr: float = 2e-4
    # eval
    contexts: tuple[int, ...] = (512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    samples: int = 25
    loss_sequences: int = 32
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0


FULL = Settings()
SMOKE = Settings(max_corpus_bytes=400_000, heldout_per_mille=250, tokenizer_bytes=200_000, vocab_size=512,
                 shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=16, max_position_embeddings=256),
                 seq_len=256, window=32, retrieval_docs=64, kv_needles=4, pre_steps=12, pre_batch=4,
                 pre_lr=3e-3, pre_warmup=2, consa_steps=4, consa_batch=2, consa_docs=16, s2_steps=2, s2_batch=2,
                 contexts=(128, 256), depths=(0.0, 0.5), samples=2, loss_sequences=2, device="cpu",
                 dtype="float32")

CONSA_VARIANTS = {  # name -> (granularity, constraint)
    "consa-kv_head-per-layer": ("kv_head", "per-layer"),
    "consa-kv_head-global": ("kv_head", "global"),
    "consa-layer": ("layer", "global"),
}
RULES = ("interleave", "bottom", "middle", "uniform")


# ------------------------------------------------------------------ phase 1: corpus


def phase_corpus(out: Path, s: Settings) -> bool:
    """Corpus, tokenizer, token ids and retrieval documents under ``out/corpus``.

    Takes no time budget: it always runs to the end, and returns True (finished).
    """
    import numpy as np

    from consa_vllm.tiny import build_tokenizer

    from .corpus import build_corpus, read_texts

    d = out / "corpus"
    if (d / "done").exists():
        return True
    log(f"corpus: reading Python files (up to {s.max_corpus_bytes / 1e6:.0f} MB)")
    m = build_corpus(d, s.max_corpus_bytes, s.heldout_per_mille)
    n_train = sum(f.split == "train" for f in m.files)
    log(f"corpus: {len(m.files)} files ({n_train} train), {sum(f.bytes for f in m.files) / 1e6:.1f} MB")
    tok_dir = d / "tokenizer"
    sample = d / "tokenizer-sample"
    sample.mkdir(exist_ok=True)
    texts = read_texts(d / "train.jsonl", s.tokenizer_bytes)
    paths = []
    for i, t in enumerate(texts):
        p = sample / f"{i:06d}.py"
        p.write_text(t)
        paths.append(p)
    tok = build_tokenizer(tok_dir, vocab_size=s.vocab_size, files=paths)
    log(f"corpus: tokenizer with {len(tok)} tokens")
    for split in ("train", "heldout"):
        ids: list[np.ndarray] = []
        batch: list[str] = []

        def flush():
            if not batch:
                return
            for row in tok(batch, add_special_tokens=False)["input_ids"]:
                ids.append(np.asarray(row + [tok.eos_token_id], dtype=np.int32))
            batch.clear()

        for t in read_texts(d / f"{split}.jsonl"):
            batch.append(t)
            if len(batch) == 256:
                flush()
        flush()
        arr = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
        np.save(d / f"{split}_ids.npy", arr)
        log(f"corpus: {split}: {arr.size / 1e6:.2f} M tokens")
    make_retrieval_docs(d, s, tok)
    (d / "done").write_text("ok\n")
    return True


def retrieval_tasks():
    """The two tasks mixed into training, the same presets ``consa-vllm eval`` measures."""
    from consa_vllm.eval.tasks import KV, PASSKEY

    return KV, PASSKEY


def _docs_worker(args):
    start, count, seed, seq_len, window, kv_needles, corpus_dir, structures = args
    import numpy as np
    from transformers import AutoTokenizer

    from consa_vllm.eval.tasks import Filler, training_document

    tok = AutoTokenizer.from_pretrained(str(Path(corpus_dir) / "tokenizer"))
    filler = Filler(tok, ids=np.load(Path(corpus_dir) / "train_ids.npy", mmap_mode="r"))
    kv, passkey = retrieval_tasks()
    ids = np.zeros((count, seq_len), dtype=np.int32)
    mask = np.zeros((count, seq_len), dtype=bool)
    for i in range(count):
        rng = random.Random(f"{seed}/doc/{start + i}")
        # 3 of 4 key-value documents (many needles), 1 of 4 passkey (one needle); queries at
        # least a window away from their needles, so that only full attention answers them.
        # With ``structures`` (version 2), of every 8: 3 key-value, 1 passkey, and the rest
        # the structures in their training templates (benchmarks.testbed.tasks_v2), the last
        # one twice (variable tracking: the hardest).
        j = (start + i) % 8
        passkey_doc = j == 3 if structures else (start + i) % 4 == 3
        if structures and j >= 4:
            from .tasks_v2 import training_task_document

            x, m = training_task_document(structures[min(j - 4, len(structures) - 1)], tok, filler,
                                          seq_len - 1, rng)
        elif passkey_doc:
            x, m = training_document(passkey, tok, filler, seq_len - 1, rng, 1, window + rng.randrange(seq_len // 2))
        else:
            x, m = training_document(kv, tok, filler, seq_len - 1, rng, kv_needles, window)
        ids[i, :-1], mask[i, :-1] = x, m
        ids[i, -1] = tok.eos_token_id
    return ids, mask


def make_retrieval_docs(d: Path, s: Settings, tok, *, name: str = "retrieval", seq_len: int | None = None,
                        count: int | None = None, kv_needles: int | None = None) -> None:
    """``NAME_ids.npy`` / ``NAME_mask.npy``: ``count`` documents of ``seq_len`` tokens (default:
    ``s.retrieval_docs`` of ``s.seq_len``, with ``s.kv_needles`` key-value needles)."""
    import multiprocessing as mp

    import numpy as np

    seq_len, count = seq_len or s.seq_len, count or s.retrieval_docs
    n_proc = max(1, min(16, os.cpu_count() or 1))
    chunk = -(-count // n_proc)
    structures = tuple(getattr(s, "train_structures", ()))  # version 2's Settings2 only
    jobs = [(i, min(chunk, count - i), s.seed, seq_len, s.window, kv_needles or s.kv_needles, str(d), structures)
            for i in range(0, count, chunk)]
    if n_proc > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(n_proc) as pool:
            parts = pool.map(_docs_worker, jobs)
    else:
        parts = [_docs_worker(j) for j in jobs]
    np.save(d / f"{name}_ids.npy", np.concatenate([p[0] for p in parts]))
    np.save(d / f"{name}_mask.npy", np.concatenate([p[1] for p in parts]))
    log(f"corpus: {count} retrieval documents of {seq_len} tokens")


class Mix:
    """Batches of plain code chunks and retrieval documents, a pure function of (seed, step)."""

    def __init__(self, corpus_dir: Path, s: Settings, batch: int, seed: int, *, docs: str = "retrieval"):
        import numpy as np

        self.code = np.load(corpus_dir / "train_ids.npy", mmap_mode="r")
        self.docs = np.load(corpus_dir / f"{docs}_ids.npy", mmap_mode="r")
        self.mask = np.load(corpus_dir / f"{docs}_mask.npy", mmap_mode="r")
        self.s, self.batch, self.seed = s, batch, seed
        self.seq_len = self.docs.shape[1]  # code chunks match the documents' length

    def __call__(self, step: int):
        import numpy as np
        import torch

        rng = np.random.default_rng([self.seed, step])
        T = self.seq_len
        n_ret = round(self.batch * self.s.retrieval_fraction)
        rows = rng.integers(0, len(self.docs), n_ret)
        starts = rng.integers(0, len(self.code) - T, self.batch - n_ret)
        ids = [np.asarray(self.docs[r]) for r in rows] + [np.asarray(self.code[a:a + T]) for a in starts]
        mask = [np.asarray(self.mask[r]) for r in rows] + [np.zeros(T, dtype=bool)] * len(starts)
        return torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(mask))


# ------------------------------------------------------------------ phase 2: pretrain


def phase_pretrain(out: Path, s: Settings, max_minutes: float | None, batches=None,
                   describe: str | None = None) -> bool:
    """Pretrain the dense model to ``out/pretrained``; returns False if the time budget ran out first.

    ``batches(step)``: the batches (default: :class:`Mix` of ``s.pre_batch`` x ``s.seq_len``);
    ``describe``: what they are, for the log."""
    import torch

    from .lm import build_model, train_lm, write_json

    dst = out / "pretrained"
    if (dst / "config.json").exists():
        return True
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "corpus" / "tokenizer"))
    model = build_model({**s.shape, "vocab_size": len(tok)}, s.seed)
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n / 1e6:.1f} M parameters, {s.pre_steps} steps, "
        + (describe or f"{s.pre_batch} x {s.seq_len} tokens each"))
    history: list[dict] = []

    def rec(r):
        history.append(r)
        if "skipped" in r:
            log(f"pretrain: step {r['step']} skipped: loss or gradient not finite ({r['skipped']} so far)")
        else:
            log(f"pretrain: step {r['step']} loss {r['loss']:.3f} ({r['seconds']:.0f} s)")

    res = train_lm(model, batches or Mix(out / "corpus", s, s.pre_batch, s.seed), s.pre_steps, s.pre_lr,
                   warmup=s.pre_warmup, answer_weight=s.answer_weight, device=s.device,
                   autocast_dtype="bfloat16" if s.dtype == "bfloat16" else None, log=rec,
                   log_every=max(1, s.pre_steps // 20), ckpt_dir=out / "pretrain-state", ckpt_every=200,
                   max_seconds=max_minutes * 60 if max_minutes else None)
    with open(out / "pretrain-log.jsonl", "a") as f:
        for r in history:
            f.write(json.dumps(r) + "\n")
    if not res["done"]:
        log(f"pretrain: stopped at step {res['step']} (time budget); rerun to continue")
        return False
    model.to(torch.float32 if s.dtype == "float32" else torch.bfloat16).save_pretrained(str(dst))
    tok.save_pretrained(str(dst))
    # Over every call of a pretraining split by time budgets: the log file has them all.
    skipped = sum('"skipped"' in line for line in (out / "pretrain-log.jsonl").read_text().splitlines())
    write_json(out / "pretrain.json", {"steps": res["step"], "final_loss": res["last_loss"], "parameters": n,
                                       "skipped_steps": skipped})
    return True


# ------------------------------------------------------------------ phase 3: allocations


def _consa_data(out: Path, s: Settings) -> Path:
    """Text of the same mix for the trainer: retrieval documents and code chunks (``consa_docs`` of each kind)."""
    from transformers import AutoTokenizer

    path = out / "allocations" / "consa-data.jsonl"
    if path.exists():
        return path
    tok = AutoTokenizer.from_pretrained(str(out / "corpus" / "tokenizer"))
    mix = Mix(out / "corpus", s, 2, s.seed + 7)
    rows = []
    for i in range(s.consa_docs):
        ids, _ = mix(10_000_000 + i)
        for row in ids.tolist():
            rows.append(json.dumps({"text": tok.decode(row[:-1] if row[-1] == tok.eos_token_id else row)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: version 2 runs one process per GPU, and a second one must never read a
    # half-written file (the content is a pure function of the settings, so the last rename is harmless).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(path)
    return path


def phase_allocations(out: Path, s: Settings, max_minutes: float | None) -> bool:
    """ConSA allocations with ``python -m consa_vllm.train`` (masks-only) and the rule-based ones.

    Returns False when the time budget ran out before a trainer run (rerun to continue).
    """
    from consa_vllm.allocation import Allocation, make_allocation

    t_start = time.time()
    d = out / "allocations"
    d.mkdir(parents=True, exist_ok=True)
    L, H = s.shape["num_hidden_layers"], s.shape["num_key_value_heads"]
    data = _consa_data(out, s)
    for rho in s.rhos:
        for name, (gran, constraint) in CONSA_VARIANTS.items():
            dst = d / f"{name}-{rho}.json"
            if dst.exists():
                continue
            if max_minutes is not None and time.time() - t_start > max_minutes * 60:
                log("allocations: time budget spent; rerun to continue")
                return False
            cmd = [sys.executable, "-m", "consa_vllm.train", "--model", str(out / "pretrained"), "--data", str(data),
                   "--seq-len", str(s.seq_len), "--target-sparsity", str(rho), "--granularity", gran,
                   "--constraint", constraint, "--window", str(s.window), "--steps", str(s.consa_steps),
                   "--batch-size", str(s.consa_batch), "--freeze-weights", "--gate-lr", str(s.gate_lr),
                   "--lagrangian-lr", str(s.lagrangian_lr), "--seed", str(s.seed), "--device", s.device,
                   "--dtype", s.dtype, "--checkpoint-every", "0", "--no-progress", "--out", str(dst),
                   "--log-dir", str(d / f"{name}-{rho}.logs"),
                   "--force"]  # a run cut short by the time budget left its logs: start that one again
            log(f"allocations: {name} rho={rho}")
            t0 = time.time()
            subprocess.run(cmd, check=True)
            log(f"allocations: {name} rho={rho} done in {time.time() - t0:.0f} s")
        for rule in RULES:
            dst = d / f"rule-{rule}-{rho}.json"
            if not dst.exists():
                make_allocation(rule, rho, L, H, s.window, granularity="kv_head", seed=s.seed).save(dst)
    dense = d / "dense.json"
    if not dense.exists():
        Allocation(granularity="kv_head", window=s.window, pattern=["F" * H] * L, rule="dense").save(dense)
    return True


def allocation_names(out: Path) -> list[str]:
    """Allocation files of the run, dense first."""
    names = sorted(p.stem for p in (out / "allocations").glob("*.json"))
    return ["dense"] + [n for n in names if n != "dense"]


# ------------------------------------------------------------------ phase 4: stage 2


def phase_stage2(out: Path, s: Settings, max_minutes: float | None, names: list[str] | None = None) -> bool:
    """The same weight training for every allocation, from the same checkpoint, into ``out/stage2/NAME``.

    ``names``: only these allocations (default: all of the run; version 2 splits them over GPUs).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from consa_vllm.allocation import Allocation
    from consa_vllm.reference import patch_model
    from consa_vllm.train.export import save_trained_model

    from .lm import train_lm

    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(str(out / "pretrained"))
    for name in allocation_names(out) if names is None else names:
        dst = out / "stage2" / name
        if (dst / "config.json").exists():
            continue
        if max_minutes and time.time() - t_start > max_minutes * 60:
            log("stage2: time budget spent; rerun to continue")
            return False
        alloc = Allocation.load(out / "allocations" / f"{name}.json")
        model = AutoModelForCausalLM.from_pretrained(str(out / "pretrained"), dtype=torch.float32)
        model.config.use_cache = False
        state = patch_model(model, window=alloc.window, allocation=alloc)
        t0 = time.time()
        # Same seed for every allocation: the same batches in the same order.
        res = train_lm(model, Mix(out / "corpus", s, s.s2_batch, s.seed + 1), s.s2_steps, s.s2_lr,
                       warmup=min(10, s.s2_steps), answer_weight=s.answer_weight, device=s.device,
                       autocast_dtype="bfloat16" if s.dtype == "bfloat16" else None, log_every=10**9)
        state.disable()  # the stock config back before save_pretrained
        model.to(getattr(torch, s.dtype))
        save_trained_model(model, tok, alloc.with_extra(stage2={"steps": s.s2_steps, "lr": s.s2_lr,
                                                                "final_loss": res["last_loss"]}),
                           dst, str(out / "pretrained"))
        log(f"stage2: {name} done in {time.time() - t0:.0f} s (loss {res['last_loss']:.3f})")
        del model
    return True


# ------------------------------------------------------------------ phase 5: eval


def phase_eval(out: Path, s: Settings, max_minutes: float | None) -> bool:
    """``consa_vllm.eval`` on every stage-2 model: ``out/eval/NAME.json``."""
    from consa_vllm.allocation import Allocation
    from consa_vllm.eval.cli import evaluate

    t_start = time.time()
    for name in allocation_names(out):
        dst = out / "eval" / f"{name}.json"
        if dst.exists():
            continue
        if max_minutes and time.time() - t_start > max_minutes * 60:
            log("eval: time budget spent; rerun to continue")
            return False
        alloc = Allocation.load(out / "allocations" / f"{name}.json")
        r = evaluate(out / "stage2" / name, alloc, alloc.window, data=[str(out / "corpus" / "heldout.jsonl")],
                     tasks=("passkey", "kv"), contexts=s.contexts, depths=s.depths, samples=s.samples,
                     loss_seq_len=s.seq_len, loss_sequences=s.loss_sequences, seed=s.seed + 1234,
                     device=s.device, dtype=s.dtype, batch_size=8)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(r.model_dump_json(indent=1) + "\n")
        log(f"eval: {name}: retrieval {r.retrieval['accuracy']:.3f} "
            f"(beyond window {r.retrieval['accuracy_beyond_window']:.3f}), loss {r.loss['loss']:.4f} "
            f"({r.seconds:.0f} s)")
    return True


# ------------------------------------------------------------------ phase 6: report


def phase_report(out: Path, s: Settings) -> dict:
    """``results.json``, ``results.md`` and ``heatmaps/NAME.png``."""
    from consa_vllm.allocation import Allocation, plot_allocation

    from .lm import write_json

    rows = []
    for name in allocation_names(out):
        alloc = Allocation.load(out / "allocations" / f"{name}.json")
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        kind = "dense" if name == "dense" else "consa" if name.startswith("consa") else "rule"
        kv = ev["kv"][-1] if ev["kv"] else {}
        rows.append({
            "name": name, "kind": kind, "rho": alloc.sparsity, "granularity": alloc.granularity,
            "constraint": CONSA_VARIANTS[name.rsplit("-", 1)[0]][1] if kind == "consa" else None,
            "pattern": alloc.pattern,
            "retrieval": ev["retrieval"]["accuracy"], "retrieval_beyond_window": ev["retrieval"]["accuracy_beyond_window"],
            "passkey": ev["retrieval"]["by_task"].get("passkey"), "kv": ev["retrieval"]["by_task"].get("kv"),
            "loss": ev["loss"]["loss"], "loss_beyond_window": ev["loss"]["loss_beyond_window"],
            "kv_ratio_to_dense": kv.get("ratio_to_dense"), "kv_context": kv.get("context"),
        })
        png = out / "heatmaps" / f"{name}.png"
        if not png.exists():
            png.parent.mkdir(parents=True, exist_ok=True)
            plot_allocation(alloc, png, title=name)
    dense = rows[0]
    for r in rows:
        r["retrieval_vs_dense"] = r["retrieval"] / dense["retrieval"] if dense["retrieval"] else None
    results = {"settings": s.model_dump(), "pretrain": json.loads((out / "pretrain.json").read_text()),
               "corpus_files": len(json.loads((out / "corpus" / "manifest.json").read_text())["files"]),
               "device": machine_name(s.device), "phase_seconds": phase_seconds(out), "rows": rows}
    write_json(out / "results.json", RunResults.model_validate(results).model_dump())
    lines = ["| allocation | rho | retrieval | beyond window | vs dense | passkey | kv | loss | loss beyond W "
             "| KV vs dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rho"], r["kind"] != "consa", -r["retrieval"])):
        f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        lines.append(f"| {r['name']} | {r['rho']:.2f} | {f(r['retrieval'])} | {f(r['retrieval_beyond_window'])} "
                     f"| {f(r['retrieval_vs_dense'], 2)} | {f(r['passkey'])} | {f(r['kv'])} | {f(r['loss'], 4)} "
                     f"| {f(r['loss_beyond_window'], 4)} | {f(r['kv_ratio_to_dense'], 3)} |")
    times = results["phase_seconds"]
    lines += ["", f"{results['device']}; wall minutes per phase: "
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + f" (total {sum(times.values()) / 60:.1f})"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    log("report: " + str(out / "results.md") + "\n" + "\n".join(lines))
    return results


def publish(out: Path, dst: Path) -> None:
    """Copy what is worth committing (a few MB at most) from the run directory to ``dst``."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "settings.json", "pretrain.json", "pretrain-log.jsonl"):
        shutil.copy2(out / name, dst / name)
    shutil.copy2(out / "corpus" / "manifest.json", dst / "corpus-manifest.json")
    shutil.copytree(out / "heatmaps", dst / "heatmaps", dirs_exist_ok=True)
    log(f"report: copied results to {dst}")


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """Run the phases asked for (default: all, in order), skipping finished work."""
    p = make_parser("python -m benchmarks.testbed.run", __doc__,
                    results_help="after the report, copy the small artifacts there (results.json/.md, heatmaps/, "
                                 "corpus manifest, pretraining log) for committing")
    args = p.parse_args(argv)
    s, out = open_run(p, args, SMOKE if args.smoke else FULL)
    return run_phases(args, out, {
        "corpus": lambda left: phase_corpus(out, s),  # no time budget: it always runs to the end
        "pretrain": lambda left: phase_pretrain(out, s, left),
        "allocations": lambda left: phase_allocations(out, s, left),
        "stage2": lambda left: phase_stage2(out, s, left),
        "eval": lambda left: phase_eval(out, s, left),
    }, report=lambda: phase_report(out, s), publish=publish)


if __name__ == "__main__":
    sys.exit(main())
