"""Testbed version 2: ConSA against DuoAttention-style identification and rules, with significance.

Version 1 (``benchmarks.testbed.run``, results in ``benchmarks/testbed/results``) stays as it is.
Version 2 reuses its corpus, pretraining and stage-2 phases with larger sizes, and adds:

- context 8192, window 512, every allocation without and with 64 attention-sink tokens;
- a DuoAttention-style allocation (``python -m consa_vllm.train --method duo``) beside ConSA
  kv_head per-layer / global and layer, and the rules bottom, middle, interleave and seeded
  random (``uniform``: the same F count per layer), at rho 0.5 and 0.75, and dense;
- every allocation evaluated masks-only (the pretrained weights) and after the same stage 2;
- retrieval in held-out RULER-style formats (:mod:`benchmarks.testbed.tasks_v2`: multi-key,
  multi-value, variable tracking) whose wording pretraining never showed (it teaches the
  structures in templates of its own, since run 1: see tasks_v2), first needle at depth 0.1-0.5
  (>= 3,500 tokens before the query at 8k: 7 windows), the same prompts for every allocation;
  held-out loss by distance beyond the window;
- the same structures in the training templates (in-template prompts, every allocation): what
  each allocation keeps of retrieval the model has, apart from carrying it over to new wording;
- per-prompt verdicts kept, so the report gives 95% percentile-bootstrap intervals and paired
  bootstrap differences (:mod:`consa_vllm.eval.stats`), Holm-corrected within each comparison
  group, and checks the ConSA paper's ordering (kv_head per-layer > global > dense > layer > rules;
  S at the bottom, F in a middle block).

Sizes (``FULL2``) were set so that the whole run fit one 30-minute lease of one H200, from what
run 1 measured there
(``benchmarks/results/testbed_v2_h200_run1``: corpus 97 s; pretraining 0.288 s per step of
32 x 2048 tokens and 0.37 s per step of 8 x 8192; 75-105 s per trained allocation at 100 gate
steps and 40-50 s per stage 2 at 60 steps, 3 processes on the GPU; 14-86 s per allocation for
1,080 prompts): pretraining 1,200 steps of 32 x 2048 tokens, then 300 of 8 x 8192
(:class:`Curriculum`, about 7.5 minutes; run 1's loss was 1.9-2.0 at steps 1,300-1,400 and
1.83 at 1,500, and run 2's first attempt logged 1.94-2.01 from step 1,100 on, at 0.285 s per
step), gate training 80 x 4 x 8192 (about 4 minutes for the 10 trained allocations),
stage 2 32 x 4 x 8192 per allocation (about 3), and 16 in-template prompts per (structure,
context). The held-out prompts per (task, context, depth) cell were 24 (run 2) and 40 (runs 3-6),
when the whole run took about 22-27 minutes with the corpus; they are 77 since run 7, for issue
16's power target (:data:`POWER_DIFF`), and the eval of both modes then takes about 16 minutes,
so a whole run spans two leases (``gpu_v2.sh pack``/``restore``), or one lease runs one mode
(``--modes``). Stage 2 and the eval take
the allocations in priority order (:func:`priority`), so a phase cut by its time budget leaves out
the least important ones, and the report lists what is missing.

Phases (each skips finished work; ``--shard i/n`` runs every n-th job of the allocations, stage2
and eval phases; ``gpu_v2.sh`` runs several such processes per GPU)::

    python -m benchmarks.testbed.run_v2 --out DIR --phase corpus
    python -m benchmarks.testbed.run_v2 --out DIR --phase pretrain --max-minutes 9
    for i in 0..2: python -m benchmarks.testbed.run_v2 --out DIR --phase allocations --shard $i/3 &
    (the same for stage2, then eval), then --phase report --results-dir DIR2
    python -m benchmarks.testbed.run_v2 --out DIR --smoke      # every phase at toy size on CPU
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ValidationError, field_validator

from ..machine import machine_name
from .common import log, make_parser, open_run, phase_seconds, run_phases
from .run import (CONSA_VARIANTS, Mix, Settings, _consa_data, allocation_names, make_retrieval_docs, phase_corpus,
                  phase_pretrain, phase_stage2)
from .tasks_v2 import TASKS

RULES = ("bottom", "middle", "interleave", "uniform")
MODES = ("masks", "stage2")
#: The ConSA paper's ordering of retrieval accuracy, best first ("rules": the best rule).
PAPER_ORDER = ("consa-kv_head-per-layer", "consa-kv_head-global", "dense", "consa-layer", "rules")


class Settings2(Settings):
    """Version-2 sizes: :class:`benchmarks.testbed.run.Settings` plus sinks, DuoAttention, the eval and a
    pretraining curriculum."""

    # Pretraining's first ``pre_short_steps`` steps on ``pre_short_len``-token rows (as many tokens
    # per step: pre_batch x seq_len / pre_short_len rows), with their own retrieval documents;
    # the rest on seq_len. 0: seq_len throughout.
    pre_short_len: int = 0
    pre_short_steps: int = 0
    short_retrieval_docs: int = 0
    short_kv_needles: int = 24
    # The task structures the retrieval documents also teach, in training templates
    # (tasks_v2.training_task_document); the eval's wording stays held out.
    train_structures: tuple[str, ...] = TASKS
    # In-template prompts per (structure, context) for every allocation (0: none); eval_prompts.
    template_per_cell: int = 16

    sinks: tuple[int, ...] = (0, 64)
    sink_rhos: tuple[float, ...] = (0.75,)  # the rhos at which the sink > 0 variants are made (budget)
    # The allocations made with sinks (None: every learned one and every rule).
    sink_bases: tuple[str, ...] | None = None
    rules: tuple[str, ...] = RULES
    duo_steps: int = 100
    duo_gate_lr: float = 0.02
    duo_l1: float = 0.05
    eval_tasks: tuple[str, ...] = TASKS
    eval_contexts: tuple[int, ...] = (2048, 4096, 8192)
    eval_depths: tuple[float, ...] = (0.1, 0.3, 0.5)
    # 3 tasks x 3 contexts x 3 depths x 84 = 2,268 prompts per allocation and mode: a 2-point difference
    # is 3 standard errors when the two allocations disagree on <= 10% of the prompts (paired:
    # se = sqrt(0.10 / 2268) = 0.0066), or unpaired when both accuracies are >= 0.95 or <= 0.05
    # (se = sqrt(2 x 0.95 x 0.05 / 2268) = 0.0065); at accuracy 0.5 unpaired it would take 11,250
    # (consa_vllm.eval.stats.prompts_for_difference). The report gives each difference's own se.
    # FULL2 takes 77 (2,079 prompts: 3 se at disagreement <= 9.2%, the most run 6 saw between two
    # allocations); run 7 measured it: every pair met the target masks-only. At that size both
    # modes no longer fit one lease (about 33 minutes of machine time, from run 7's first half).
    per_cell: int = 84
    eval_batch: int = 4
    # The modes every allocation is evaluated in (stage 2 is trained only when "stage2" is one).
    # One mode at 77 prompts per cell fits one lease (about 25 minutes with pretraining).
    modes: tuple[str, ...] = MODES

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(m not in MODES for m in v) or len(set(v)) != len(v):
            raise ValueError(f"modes must be one or both of {', '.join(MODES)} (each once), got {', '.join(v) or 'none'}")
        return tuple(m for m in MODES if m in v)  # the report's order, whatever the order asked


FULL2 = Settings2(
    max_corpus_bytes=240_000_000, vocab_size=8192,
    shape=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=8192),
    seq_len=8192, window=512, retrieval_docs=4000, kv_needles=48,
    pre_steps=1500, pre_batch=8, pre_lr=1e-3, pre_warmup=100, pre_short_len=2048, pre_short_steps=1200,
    short_retrieval_docs=16_000,
    consa_steps=80, consa_batch=4, duo_steps=80, consa_docs=400, s2_steps=32, s2_batch=4, loss_sequences=24,
    sink_bases=("consa-kv_head-per-layer", "duo"), per_cell=77, eval_batch=8)
SMOKE2 = Settings2(
    max_corpus_bytes=400_000, heldout_per_mille=250, tokenizer_bytes=200_000, vocab_size=512,
    shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, head_dim=16, max_position_embeddings=1024),
    # room for the training templates: a multi-key document's needles and questions take 252-309 tokens of
    # this 512-token vocabulary (measured on 20 documents)
    seq_len=1024, window=32, rhos=(0.75,), retrieval_docs=32, kv_needles=4, pre_steps=6, pre_batch=2, pre_lr=3e-3,
    pre_warmup=2, pre_short_len=512, pre_short_steps=3, short_retrieval_docs=16, short_kv_needles=2,
    consa_steps=2, consa_batch=2, consa_docs=8, s2_steps=1, s2_batch=2, loss_sequences=2,
    sinks=(0, 4), sink_rhos=(0.75,), rules=("bottom", "uniform"), duo_steps=2, eval_contexts=(512,), template_per_cell=2,
    eval_depths=(0.1, 0.5), per_cell=1, eval_batch=8, device="cpu", dtype="float32")


# ------------------------------------------------------------------ corpus and pretraining


def phase_corpus2(out: Path, s: Settings2) -> bool:
    """Version 1's corpus phase, plus the curriculum's short retrieval documents."""
    phase_corpus(out, s)
    d = out / "corpus"
    if s.pre_short_len and not (d / "short-done").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
        make_retrieval_docs(d, s, tok, name="retrieval_short", seq_len=s.pre_short_len,
                            count=s.short_retrieval_docs, kv_needles=s.short_kv_needles)
        (d / "short-done").write_text("ok\n")
    return True


class Curriculum:
    """Pretraining batches, a pure function of the step: ``pre_short_len``-token rows for the first
    ``pre_short_steps`` steps, then ``seq_len`` rows, the same number of tokens per step.

    A model of this size trained from scratch on 8k-token rows alone learned far slower per
    token than version 1's on 2k rows (session 4 on the H200: loss 7.7 after 640 steps at 5e-4,
    and NaN near step 470 at 1e-3; version 1: 5.7 at step 500, 1.7 at step 2,000). The long
    steps come last, where the cosine schedule has lowered the learning rate.
    """

    def __init__(self, out: Path, s: Settings2):
        self.short_steps = s.pre_short_steps if s.pre_short_len else 0
        self.long = Mix(out / "corpus", s, s.pre_batch, s.seed)
        self.short = (Mix(out / "corpus", s, s.pre_batch * s.seq_len // s.pre_short_len, s.seed, docs="retrieval_short")
                      if self.short_steps else None)

    def __call__(self, step: int):
        return self.short(step) if step < self.short_steps else self.long(step)

    def describe(self) -> str:
        """What the batches are, for the log."""
        long = f"{self.long.batch} x {self.long.seq_len} tokens"
        if not self.short_steps:
            return long + " each"
        return (f"the first {self.short_steps} of {self.short.batch} x {self.short.seq_len} tokens, "
                f"the rest of {long}")


def phase_pretrain2(out: Path, s: Settings2, max_minutes: float | None) -> bool:
    """Version 1's pretraining with the :class:`Curriculum`'s batches."""
    batches = Curriculum(out, s)
    return phase_pretrain(out, s, max_minutes, batches=batches, describe=batches.describe())


def groups(s: Settings2) -> list[tuple[int, float]]:
    """The (sink, rho) combinations of the run: every rho without sinks, ``sink_rhos`` with them."""
    return [(k, rho) for k in s.sinks for rho in s.rhos if k == 0 or rho in s.sink_rhos]


#: Stage 2 and the eval run the allocations in this order of bases (then rho 0.75, sinks, rho 0.5).
PRIORITY = ("dense", "consa-kv_head-per-layer", "duo", "consa-kv_head-global", "consa-layer", "rule-uniform",
            "rule-bottom", "rule-middle", "rule-interleave")


def priority(names: list[str]) -> list[str]:
    """``names`` most important first: by group (rho 0.75 without sinks, with sinks, then the other
    rhos), then by base (:data:`PRIORITY`)."""
    def key(name: str):
        base, rho, sink = base_of(name)
        group = 0 if base == "dense" else 1 if (rho == 0.75 and not sink) else 2 if sink else 3
        return group, PRIORITY.index(base) if base in PRIORITY else len(PRIORITY), -rho, name
    return sorted(names, key=key)


def alloc_name(base: str, rho: float, sink: int) -> str:
    return f"{base}-{rho}" + (f"-sink{sink}" if sink else "")


def shard(jobs: list, spec: str | None) -> list:
    """Every n-th job from the i-th (``spec`` = ``"i/n"``); all of them without a spec."""
    if not spec:
        return jobs
    i, n = (int(x) for x in spec.split("/"))
    return jobs[i::n]


# ------------------------------------------------------------------ allocations


def allocation_jobs(out: Path, s: Settings2) -> list[tuple[str, Callable[[Path], None]]]:
    """``(name, write(dst))`` for every allocation of the run (phase_allocations makes them in priority order)."""
    from consa_vllm.allocation import Allocation, make_allocation
    from consa_vllm.train import TrainConfig, train

    L, H = s.shape["num_hidden_layers"], s.shape["num_key_value_heads"]
    d = out / "allocations"

    def learned(name: str, **kw) -> Callable[[Path], None]:
        def run(dst: Path) -> None:
            data = _consa_data(out, s)
            train(TrainConfig(model=str(out / "pretrained"), data=[str(data)], seq_len=s.seq_len, window=s.window,
                              seed=s.seed, device=s.device, dtype=s.dtype, checkpoint_every=0, progress=False,
                              out=str(dst), log_dir=str(d / f"{name}.logs"), **kw))
        return run

    def rule(r: str, rho: float, sink: int) -> Callable[[Path], None]:
        def run(dst: Path) -> None:
            a = make_allocation(r, rho, L, H, s.window, granularity="kv_head", seed=s.seed)
            Allocation.from_dict({**a.to_dict(), "sink": sink}).save(dst)
        return run

    def made(base: str, sink: int) -> bool:
        return not sink or s.sink_bases is None or base in s.sink_bases

    jobs: list[tuple[str, Callable[[Path], None]]] = []
    for sink, rho in groups(s):
        for base, (gran, constraint) in CONSA_VARIANTS.items():
            if not made(base, sink):
                continue
            jobs.append((alloc_name(base, rho, sink), learned(
                alloc_name(base, rho, sink), target_sparsity=rho, granularity=gran, constraint=constraint, sink=sink,
                steps=s.consa_steps, batch_size=s.consa_batch, freeze_weights=True, gate_lr=s.gate_lr,
                lagrangian_lr=s.lagrangian_lr)))
        if not made("duo", sink):
            continue
        jobs.append((alloc_name("duo", rho, sink), learned(
            alloc_name("duo", rho, sink), method="duo", target_sparsity=rho, constraint="global", sink=sink,
            steps=s.duo_steps, batch_size=s.consa_batch, gate_lr=s.duo_gate_lr, duo_l1=s.duo_l1)))
    for sink, rho in groups(s):
        jobs += [(alloc_name(f"rule-{r}", rho, sink), rule(r, rho, sink)) for r in s.rules if made(f"rule-{r}", sink)]
    jobs.append(("dense", lambda dst: Allocation(granularity="kv_head", window=s.window, pattern=["F" * H] * L,
                                                 rule="dense").save(dst)))
    return jobs


def phase_allocations(out: Path, s: Settings2, max_minutes: float | None, spec: str | None) -> bool:
    t0 = time.time()
    (out / "allocations").mkdir(parents=True, exist_ok=True)
    jobs = dict(allocation_jobs(out, s))
    for name, write in shard([(n, jobs[n]) for n in priority(list(jobs))], spec):
        dst = out / "allocations" / f"{name}.json"
        if dst.exists():
            continue
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            log("allocations: time budget spent; rerun to continue")
            return False
        t1 = time.time()
        write(dst)
        log(f"allocations: {name} in {time.time() - t1:.0f} s")
    return True


# ------------------------------------------------------------------ eval


def eval_prompts(out: Path, s: Settings2):
    """The held-out prompts, the in-template prompts and the held-out loss sequences (the same for
    every allocation).

    In-template prompts (:func:`benchmarks.testbed.tasks_v2.make_training_sample`,
    ``template_per_cell`` per structure and context): the structures in the wording pretraining
    used, so their accuracy says what each allocation keeps of retrieval the model has, apart
    from carrying it over to the held-out wording."""
    import numpy as np
    from transformers import AutoTokenizer

    from consa_vllm.eval.cli import read_loss_sequences
    from consa_vllm.eval.tasks import Filler, sample_grid

    from .tasks_v2 import make_task_samples, make_training_sample

    tok = AutoTokenizer.from_pretrained(str(out / "pretrained"))
    filler = Filler(tok, ids=np.load(out / "corpus" / "heldout_ids.npy", mmap_mode="r"))
    prompts = make_task_samples(s.eval_tasks, tok, filler, s.eval_contexts, s.eval_depths, s.per_cell,
                                seed=s.seed + 4321, window=s.window)
    tasks = list(s.train_structures)
    templated = sample_grid(tasks, s.eval_contexts, (0.0,), s.template_per_cell, s.seed + 99,
                            lambda i, c, d, rng: make_training_sample(tasks[i], tok, filler, c, rng, s.window)) \
        if s.template_per_cell else []
    loss_seqs = read_loss_sequences([str(out / "corpus" / "heldout.jsonl")], tok, s.seq_len, s.loss_sequences)
    return prompts, templated, loss_seqs


def beyond(sample, window: int, sink: int) -> bool:
    """No needle the answer needs is visible to an S head (window ``window``, ``sink`` sinks) from the query:
    the closest one's last token lies ``window`` or more tokens back, its first at or after the sinks
    (:attr:`consa_vllm.eval.tasks.Sample.beyond_window` with this allocation's window and sink)."""
    return (sample.distance - (sample.needle_tokens - 1) >= window
            and sample.context - 1 - sample.distance >= sink)


def eval_one(model, alloc, prompts, templated, loss_seqs, s: Settings2) -> dict:
    """Per-prompt verdicts, accuracy by task, the same on the in-template prompts ``templated``,
    held-out loss by distance beyond the window.

    ``model``: an HF model; it is (re)patched with ``alloc`` (its window and sink) here.
    """
    from consa_vllm.eval.metrics import lm_loss, score_retrieval
    from consa_vllm.reference import patch_model

    patch_model(model, window=alloc.window, allocation=alloc)
    ok = [int(v) for v in score_retrieval(model, prompts, batch_size=s.eval_batch)]
    loss = lm_loss(model, loss_seqs, alloc.window, batch_size=s.eval_batch)

    def by_task(samples, verdicts, tasks, suffix: str = "") -> dict[str, float]:
        return {t: sum(v for x, v in zip(samples, verdicts) if x.task == t + suffix)
                / sum(x.task == t + suffix for x in samples) for t in tasks}

    far = [v for p, v in zip(prompts, ok) if beyond(p, alloc.window, alloc.sink)]
    tpl_ok = [int(v) for v in score_retrieval(model, templated, batch_size=s.eval_batch)] if templated else []
    template = {"template_verdicts": tpl_ok, "template_by_task": by_task(templated, tpl_ok, s.train_structures,
                                                                         "-train")} if templated else {}
    return {"accuracy": sum(ok) / len(ok), "by_task": by_task(prompts, ok, s.eval_tasks),
            "accuracy_beyond_window": sum(far) / len(far) if far else None, "prompts_beyond_window": len(far),
            "loss": loss["loss"], "loss_beyond_window": loss["loss_beyond_window"],
            "loss_beyond_window_per_sequence": loss["loss_beyond_window_per_sequence"], "verdicts": ok, **template}


def phase_eval(out: Path, s: Settings2, max_minutes: float | None, spec: str | None) -> bool:
    """Every allocation, masks-only and after stage 2: ``out/eval/MODE/NAME.json``."""
    from consa_vllm.allocation import Allocation

    t0 = time.time()
    jobs = shard([(m, n) for n in priority(allocation_names(out)) for m in s.modes], spec)
    from consa_vllm.eval.cli import load_reference

    prompts = templated = loss_seqs = pretrained = None
    for mode, name in jobs:
        dst = out / "eval" / mode / f"{name}.json"
        if dst.exists():
            continue
        if mode == "stage2" and not (out / "stage2" / name / "config.json").exists():
            # Stage 2 ran out of its budget before this allocation (it goes in priority order).
            log(f"eval: stage2 {name}: no stage-2 model, skipped")
            continue
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            log("eval: time budget spent; rerun to continue")
            return False
        if prompts is None:
            prompts, templated, loss_seqs = eval_prompts(out, s)
            log(f"eval: {len(prompts)} held-out and {len(templated)} in-template prompts per allocation")
        alloc = Allocation.load(out / "allocations" / f"{name}.json")
        t1 = time.time()
        if mode == "masks":  # one load of the pretrained weights serves every masks-only allocation
            if pretrained is None:
                pretrained = load_reference(out / "pretrained", None, alloc.window, s.device, s.dtype)
            model = pretrained
        else:
            model = load_reference(out / "stage2" / name, None, alloc.window, s.device, s.dtype)
        r = eval_one(model, alloc, prompts, templated, loss_seqs, s)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(r) + "\n")
        tpl = f", in-template {sum(r['template_verdicts']) / len(templated):.3f}" if templated else ""
        log(f"eval: {mode} {name}: retrieval {r['accuracy']:.3f}{tpl}, loss {r['loss']:.4f} "
            f"({time.time() - t1:.0f} s)")
    return True


# ------------------------------------------------------------------ report


class Row(BaseModel):
    """One allocation in one mode: retrieval with its 95% bootstrap interval, loss, pattern."""

    name: str
    mode: str
    base: str  # the allocation without rho and sink: dense, consa-..., duo, rule-...
    rho: float
    sink: int
    accuracy: float
    ci_low: float
    ci_high: float
    by_task: dict[str, float]
    accuracy_beyond_window: float | None
    loss: float
    loss_beyond_window: float | None
    # Retrieval on the in-template prompts with its 95% bootstrap interval (None: not run, run 1)
    template_accuracy: float | None = None
    template_ci_low: float | None = None
    template_ci_high: float | None = None
    # 95% bootstrap interval of loss_beyond_window over the held-out sequences (None: not kept, run 1)
    loss_ci_low: float | None = None
    loss_ci_high: float | None = None
    pattern: list[str]


class Difference(BaseModel):
    """A paired comparison ``a - b`` on the same prompts, within one (mode, rho, sink) group."""

    group: str
    a: str
    b: str
    diff: float
    low: float
    high: float
    p_value: float
    p_holm: float
    significant: bool  # Holm-adjusted p < 0.05
    # Bootstrap standard error of the paired difference (None in reports before run 7)
    se: float | None = None


class ResultsV2(BaseModel):
    settings: dict
    pretrain: dict
    device: str
    phase_seconds: dict[str, float]
    prompts: int
    rows: list[Row]
    differences: list[Difference]
    # The same for the held-out loss beyond the window, paired over sequences (a - b > 0: a loses more)
    loss_differences: list[Difference] = []
    paper_order: list[dict]
    layer_pattern: list[dict]
    missing: list[str] = []  # MODE/NAME not evaluated (a phase's time budget ran out first)
    template_prompts: int = 0  # in-template prompts per allocation and mode (0 before run 2)
    # Paired differences on the in-template prompts, as ``differences``
    template_differences: list[Difference] = []
    # Each allocation with sinks against the same base and rho without them (issue 13's evidence),
    # on retrieval and on the loss beyond W, every pair listed; Holm within each mode and sink
    sink_differences: list[Difference] = []
    sink_loss_differences: list[Difference] = []


def base_of(name: str) -> tuple[str, float, int]:
    """``consa-layer-0.75-sink64`` -> ``("consa-layer", 0.75, 64)``; dense -> ``("dense", 0.0, 0)``."""
    if name == "dense":
        return "dense", 0.0, 0
    parts = name.split("-")
    sink = 0
    if parts[-1].startswith("sink"):
        sink = int(parts.pop()[4:])
    return "-".join(parts[:-1]), float(parts[-1]), sink


def holm(p: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as ``p``)."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    adj, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def thirds(pattern: list[str]) -> dict[str, float]:
    """F fraction of the bottom, middle and top third of the layers."""
    n = len(pattern)
    cut = [0, n // 3, n - n // 3, n]
    f = lambda rows: sum(r.count("F") for r in rows) / max(1, sum(len(r) for r in rows))  # noqa: E731
    return {k: f(pattern[cut[i]:cut[i + 1]]) for i, k in enumerate(("bottom", "middle", "top"))}


def phase_report(out: Path, s: Settings2) -> dict:
    """``results.json``, ``results.md`` and ``heatmaps/NAME.png`` (learned allocations)."""
    from consa_vllm.allocation import Allocation, plot_allocation
    from consa_vllm.eval.stats import bootstrap_ci, paired_bootstrap

    from .lm import write_json

    rows, verdicts, seq_losses, tpl_verdicts, missing = [], {}, {}, {}, []
    for mode in s.modes:
        for name in allocation_names(out):
            path = out / "eval" / mode / f"{name}.json"
            if not path.exists():  # a phase cut by its time budget: reported as missing
                missing.append(f"{mode}/{name}")
                continue
            alloc = Allocation.load(out / "allocations" / f"{name}.json")
            ev = json.loads(path.read_text())
            ci = bootstrap_ci(ev["verdicts"], seed=s.seed)
            # Run 1 kept neither per-sequence losses nor in-template prompts: those stay None.
            per_seq = ev.get("loss_beyond_window_per_sequence") or []
            lci = bootstrap_ci(per_seq, seed=s.seed) if len(per_seq) > 1 else None
            tpl = ev.get("template_verdicts") or []
            tci = bootstrap_ci(tpl, seed=s.seed) if tpl else None
            base, rho, sink = base_of(name)
            rows.append(Row(name=name, mode=mode, base=base, rho=rho, sink=sink, accuracy=ev["accuracy"],
                            ci_low=ci.low, ci_high=ci.high, by_task=ev["by_task"],
                            accuracy_beyond_window=ev["accuracy_beyond_window"], loss=ev["loss"],
                            loss_beyond_window=ev["loss_beyond_window"], loss_ci_low=lci and lci.low,
                            loss_ci_high=lci and lci.high, template_accuracy=sum(tpl) / len(tpl) if tpl else None,
                            template_ci_low=tci and tci.low, template_ci_high=tci and tci.high,
                            pattern=alloc.pattern))
            verdicts[(mode, name)] = ev["verdicts"]
            if lci is not None:
                seq_losses[(mode, name)] = per_seq
            if tpl:
                tpl_verdicts[(mode, name)] = tpl
            if base.startswith(("consa", "duo")) and mode == s.modes[0]:  # one pattern, whatever the mode
                png = out / "heatmaps" / f"{name}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                plot_allocation(alloc, png, title=name)
    # Comparison groups: one mode, rho and sink, plus dense (equal KV memory within a group).
    diffs, loss_diffs, tpl_diffs, order_checks, pattern_checks = [], [], [], [], []

    def compare(group: str, mode: str, pairs, scores: dict) -> list[Difference]:
        """Paired bootstrap of every pair that has ``scores``, Holm-corrected within the group."""
        pairs = [(a, b) for a, b in pairs if (mode, a.name) in scores and (mode, b.name) in scores]
        res = [paired_bootstrap(scores[(mode, a.name)], scores[(mode, b.name)], seed=s.seed) for a, b in pairs]
        return [Difference(group=group, a=a.name, b=b.name, diff=r.mean, low=r.low, high=r.high, p_value=r.p_value,
                           p_holm=p, significant=p < 0.05, se=r.se)
                for (a, b), r, p in zip(pairs, res, holm([r.p_value for r in res]))]

    for mode, (sink, rho) in itertools.product(s.modes, groups(s)):
        group = f"{mode} rho={rho} sink={sink}"
        members = [r for r in rows if r.mode == mode and (r.base == "dense" or (r.rho == rho and r.sink == sink))]
        pairs = list(itertools.combinations(members, 2))
        diffs += compare(group, mode, pairs, verdicts)
        loss_diffs += compare(group, mode, pairs, seq_losses)
        tpl_diffs += compare(group, mode, pairs, tpl_verdicts)
        by_base = {r.base: r for r in members}
        rules = [r for r in members if r.base.startswith("rule-")]
        if rules:
            by_base["rules"] = max(rules, key=lambda r: r.accuracy)
        chain = [by_base[b] for b in PAPER_ORDER if b in by_base]
        for hi, lo in zip(chain, chain[1:]):
            d = next(x for x in diffs if x.group == group and {x.a, x.b} == {hi.name, lo.name})
            sign = d.diff if d.a == hi.name else -d.diff
            verdict = ("agrees" if sign > 0 else "disagrees" if sign < 0 else "equal") + (
                " (significant)" if d.significant else " (n.s.)")
            order_checks.append({"group": group, "higher_in_paper": hi.name, "lower_in_paper": lo.name,
                                 "diff": sign, "verdict": verdict})
        if mode == s.modes[0]:
            for r in members:
                if r.base.startswith(("consa", "duo")):
                    t = thirds(r.pattern)
                    pattern_checks.append({"name": r.name, **t,
                                           "s_bottom_f_middle": t["bottom"] < t["middle"]})
    # Sinks: each sink > 0 allocation against its own base and rho at sink 0 (equal KV memory but
    # for the sink blocks).
    sink_diffs, sink_loss_diffs = [], []
    for mode in s.modes:
        plain = {(r.base, r.rho): r for r in rows if r.mode == mode and r.sink == 0}
        for k in sorted({r.sink for r in rows if r.sink}):
            pairs = [(r, plain[(r.base, r.rho)]) for r in rows
                     if r.mode == mode and r.sink == k and (r.base, r.rho) in plain]
            sink_diffs += compare(f"{mode} sink={k} vs 0", mode, pairs, verdicts)
            sink_loss_diffs += compare(f"{mode} sink={k} vs 0", mode, pairs, seq_losses)
    prompts = len(next(iter(verdicts.values())))
    template_prompts = len(next(iter(tpl_verdicts.values()), []))
    results = {"settings": s.model_dump(), "pretrain": json.loads((out / "pretrain.json").read_text()),
               "device": machine_name(s.device), "phase_seconds": phase_seconds(out), "prompts": prompts,
               "rows": [r.model_dump() for r in rows], "differences": [d.model_dump() for d in diffs],
               "loss_differences": [d.model_dump() for d in loss_diffs],
               "paper_order": order_checks, "layer_pattern": pattern_checks, "missing": missing,
               "template_prompts": template_prompts, "template_differences": [d.model_dump() for d in tpl_diffs],
               "sink_differences": [d.model_dump() for d in sink_diffs],
               "sink_loss_differences": [d.model_dump() for d in sink_loss_diffs]}
    write_json(out / "results.json", ResultsV2.model_validate(results).model_dump())
    (out / "results.md").write_text(render_markdown(ResultsV2.model_validate(results)))
    log("report: " + str(out / "results.md"))
    return results


#: Issue 16's power target: a 2-point retrieval difference is at least 3 standard errors.
POWER_DIFF, POWER_SE = 0.02, 3.0


def power_lines(diffs: list[Difference]) -> list[str]:
    """Per group, how many pairs meet the power target, from each pair's own paired standard error.

    A pair whose verdicts never differ has se 0 and meets it. Reports made before the standard
    error was kept give no line.
    """
    by_group: dict[str, list[float]] = {}
    for d in diffs:
        if d.se is not None:
            by_group.setdefault(d.group, []).append(math.inf if d.se == 0 else POWER_DIFF / d.se)
    lines = []
    for group, z in by_group.items():
        finite = [x for x in z if x != math.inf]
        span = f"; {POWER_DIFF * 100:g} points are {min(finite):.1f}-{max(finite):.1f} se" if finite else ""
        lines.append(f"- {group}: {sum(x >= POWER_SE for x in z)} of {len(z)} pairs{span}")
    return lines or ["- no standard errors in this report"]


def render_markdown(r: ResultsV2) -> str:
    f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    ci = lambda x, lo, hi, p=3: f(x, p) + ("" if lo is None else f" [{lo:.{p}f}, {hi:.{p}f}]")  # noqa: E731
    lines = [f"{r.prompts} held-out prompts (and {r.template_prompts} in the training templates) per allocation "
             "and mode; 95% percentile-bootstrap intervals over prompts (loss: over sequences).", "",
             "| mode | allocation | rho | sink | retrieval [95% CI] | " + " | ".join(r.settings["eval_tasks"])
             + " | beyond W | in-template [95% CI] | loss | loss beyond W |",
             "|---" * (9 + len(r.settings["eval_tasks"])) + "|"]
    for x in sorted(r.rows, key=lambda x: (x.mode, x.rho, x.sink, -x.accuracy)):
        lines.append(f"| {x.mode} | {x.base} | {x.rho:.2f} | {x.sink} | {ci(x.accuracy, x.ci_low, x.ci_high)} | "
                     + " | ".join(f(x.by_task[t]) for t in r.settings["eval_tasks"])
                     + f" | {f(x.accuracy_beyond_window)} | {ci(x.template_accuracy, x.template_ci_low, x.template_ci_high)}"
                     + f" | {f(x.loss, 4)} | {ci(x.loss_beyond_window, x.loss_ci_low, x.loss_ci_high, 4)} |")

    def significant(diffs: list[Difference], p: int = 3) -> list[str]:
        return [f"- {d.group}: {d.a} - {d.b} = {d.diff:+.{p}f} [{d.low:+.{p}f}, {d.high:+.{p}f}], "
                f"p_holm {d.p_holm:.2g}" for d in diffs if d.significant] or ["- none"]

    lines += ["", "Significant paired differences (Holm-adjusted p < 0.05 within each group):", ""]
    lines += significant(r.differences)
    lines += ["", f"Power: pairs for which a {POWER_DIFF * 100:g}-point retrieval difference is at least {POWER_SE:g} standard "
              "errors of the paired difference (the target):", ""] + power_lines(r.differences)
    if r.template_differences:
        lines += ["", "The same on the in-template prompts:", ""] + significant(r.template_differences)
    if r.loss_differences:
        lines += ["", "Significant paired differences in held-out loss beyond W, over sequences (Holm-adjusted "
                  "p < 0.05 within each group; > 0: the first loses more):", ""]
        lines += significant(r.loss_differences, 4)
    if r.sink_differences:
        lines += ["", "Sinks: each allocation with sinks minus the same one without (paired; Holm within each "
                  "mode and sink; * significant):", ""]
        loss = {(d.group, d.a): d for d in r.sink_loss_differences}
        for d in r.sink_differences:
            line = (f"- {d.group}: {d.a}: retrieval {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
                    + ("*" if d.significant else ""))
            if (d.group, d.a) in loss:
                x = loss[(d.group, d.a)]
                line += (f", loss beyond W {x.diff:+.4f} [{x.low:+.4f}, {x.high:+.4f}]"
                         + ("*" if x.significant else ""))
            lines.append(line)
    lines += ["", "The paper's ordering (kv_head per-layer > global > dense > layer > rules):", ""]
    lines += [f"- {c['group']}: {c['higher_in_paper']} vs {c['lower_in_paper']}: {c['diff']:+.3f}, {c['verdict']}"
              for c in r.paper_order]
    lines += ["", "Learned patterns, F fraction by third of the layers (paper: S at the bottom, F in a middle block):",
              ""]
    lines += [f"- {c['name']}: bottom {c['bottom']:.2f}, middle {c['middle']:.2f}, top {c['top']:.2f}"
              for c in r.layer_pattern]
    if r.missing:
        lines += ["", f"Not evaluated (time budget spent first): {', '.join(r.missing)}."]
    times = r.phase_seconds
    lines += ["", f"{r.device}; wall minutes per phase: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items())]
    return "\n".join(lines) + "\n"


def publish(out: Path, dst: Path) -> None:
    """Copy what is worth committing (small: JSON, allocations, per-prompt verdicts, heatmaps, logs) to ``dst``."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "settings.json", "pretrain.json", "pretrain-log.jsonl",
                 "phase-seconds.json"):
        if (out / name).exists():
            shutil.copy2(out / name, dst / name)
    shutil.copy2(out / "corpus" / "manifest.json", dst / "corpus-manifest.json")
    # A fresh copy each time: what an earlier report published but the run no longer holds
    # must not travel with this report (restore would take it for finished work).
    for sub in ("heatmaps", "eval", "allocations"):
        shutil.rmtree(dst / sub, ignore_errors=True)
    for sub in ("heatmaps", "eval"):
        shutil.copytree(out / sub, dst / sub)
    (dst / "allocations").mkdir()
    for p in (out / "allocations").glob("*.json"):
        shutil.copy2(p, dst / "allocations" / p.name)
    log(f"report: copied results to {dst}")


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """Run the phases asked for (default: all, in order), skipping finished work; ``--shard`` splits one."""
    p = make_parser("python -m benchmarks.testbed.run_v2", __doc__,
                    results_help="after the report, copy the small artifacts there")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="allocations, stage2, eval: run every N-th job from the I-th (one process per GPU)")
    p.add_argument("--per-cell", type=int, default=None, metavar="N",
                   help="override the prompts per (task, context, depth) cell (fix it before the eval phase starts)")
    p.add_argument("--modes", default=None, metavar="M[,M]",
                   help=f"evaluate in these modes only ({', '.join(MODES)}; default both); without stage2, "
                        "stage 2 is not trained (fix it when the run starts)")
    args = p.parse_args(argv)
    if args.shard is not None:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            p.exit(2, f"{p.prog}: error: --shard {args.shard}: expected I/N with 0 <= I < N\n")
        if args.phase not in ("allocations", "stage2", "eval"):
            p.exit(2, f"{p.prog}: error: --shard applies to --phase allocations, stage2 or eval\n")
    s = SMOKE2 if args.smoke else FULL2
    if args.per_cell is not None:
        if args.per_cell < 1:
            p.exit(2, f"{p.prog}: error: --per-cell must be >= 1, got {args.per_cell}\n")
        s = s.model_copy(update={"per_cell": args.per_cell})
    if args.modes is not None:
        try:
            s = type(s).model_validate({**s.model_dump(), "modes": tuple(args.modes.split(","))})
        except ValidationError as e:
            p.exit(2, f"{p.prog}: error: --modes {args.modes}: {e.errors()[0]['msg'].removeprefix('Value error, ')}\n")
    s, out = open_run(p, args, s)
    return run_phases(args, out, {
        "corpus": lambda left: phase_corpus2(out, s),  # no time budget: it always runs to the end
        "pretrain": lambda left: phase_pretrain2(out, s, left),
        "allocations": lambda left: phase_allocations(out, s, left, args.shard),
        # A run without the stage-2 mode trains no stage-2 models.
        "stage2": lambda left: "stage2" not in s.modes
        or phase_stage2(out, s, left, shard(priority(allocation_names(out)), args.shard)),
        "eval": lambda left: phase_eval(out, s, left, args.shard),
    }, report=lambda: phase_report(out, s), publish=publish,
        record_seconds=args.shard is None)  # parallel shards would race on the file; the log has their times


if __name__ == "__main__":
    sys.exit(main())
