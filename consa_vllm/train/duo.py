"""DuoAttention-style identification of retrieval heads: ``python -m consa_vllm.train --method duo``.

DuoAttention (Xiao et al., 2024) gives every KV head one gate ``alpha`` in [0, 1] that mixes its
full attention with *streaming* attention (attention sinks + a recent window):
``alpha * FA + (1 - alpha) * (sink + window)`` (the reference attention's gate mode). The model
weights stay frozen; only the gates train, against two terms:

- distillation: the mean squared difference between the last hidden states (after the final
  norm) of the gated model and of the same weights with every head full (the dense teacher),
  at the positions that predict the answers of synthetic retrieval documents (DuoAttention's
  "L2 distance of the last hidden states" on the passkey answer tokens);
- ``--duo-l1`` times the mean gate (L1: the gates are >= 0), which pushes heads that the answers
  do not need towards streaming.

After each Adam step the gates are clipped to [0, 1] (as DuoAttention does). The documents are
:func:`consa_vllm.eval.tasks.training_document`\\ s of the eval package's passkey and key-value
tasks, with --data as the haystack (filler), every needle after the sink tokens and every query's
last token at least a window after its needle's last token, so that a streaming head sees no token
of the needle from the query: only full attention can answer. At the end the gates are binarised at ``--target-sparsity`` by
:func:`consa_vllm.allocation.duo.duo_allocation`, the rule of ``consa-vllm import-duo`` (global or
per-layer by ``--constraint``), and written in the allocation format with the gates as provenance.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch

from consa_vllm.allocation import Allocation
from consa_vllm.allocation.duo import duo_allocation

from .config import ConfigError, DataError, TrainConfig, TrainingDiverged

#: Filler tokens read from --data: enough variety for the haystacks, bounded so that a large
#: corpus is not tokenized whole for a calibration of a few hundred documents.
FILLER_TOKENS_PER_SEQ = 64


def needles_for(task) -> int:
    """Needles per document: one for passkey (no key), else up to 6 keyed needles (distractors for each other)."""
    if "{key}" not in task.query:
        return 1
    return min(6, len(task.keys) - 1) if task.keys is not None else 6


def duo_batch(tasks: Sequence, tokenizer, filler, seq_len: int, window: int, sink: int, rows: int, seed: int,
              index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [rows, seq_len], answer_mask)`` of micro-batch ``index``: a pure function of ``(seed, index)``.

    Row ``r`` uses task ``(index * rows + r) % len(tasks)``; needles start at or after ``sink`` and
    every query's last token lies at least ``window`` tokens after its needle's last token, so a
    streaming head (``sink`` sinks + ``window``) sees no token of the needle from the query.
    """
    from consa_vllm.eval.tasks import training_document

    ids, masks = [], []
    for r in range(rows):
        k = index * rows + r
        rng = random.Random(f"{seed}/duo/{k}")
        task = tasks[k % len(tasks)]
        x, m = training_document(task, tokenizer, filler, seq_len, rng, needles_for(task), window, sink=sink)
        ids.append(x)
        masks.append(m)
    return torch.tensor(ids), torch.tensor(masks)


def last_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (after its final norm), ``[B, T, hidden]``: no LM head needed."""
    return model.base_model(input_ids=ids).last_hidden_state


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the hidden states at the positions that predict answer tokens.

    ``answer_mask`` marks answer tokens (target side); position ``t`` predicts token ``t + 1``.
    """
    sel = answer_mask[:, 1:]
    if not sel.any():
        raise DataError("--method duo: a batch without any answer token (documents too short for a query); "
                        "raise --seq-len")
    d = (student[:, :-1] - teacher[:, :-1]).float()
    return d[sel].pow(2).mean()


def read_filler(cfg: TrainConfig, tokenizer):
    """The haystack: token ids of --data documents (up to ``FILLER_TOKENS_PER_SEQ * seq_len``)."""
    from consa_vllm.eval.tasks import Filler, encode

    from .data import iter_documents, list_sources

    budget = FILLER_TOKENS_PER_SEQ * cfg.seq_len
    ids: list[int] = []
    for doc in iter_documents(list_sources(cfg.data), cfg.text_field):
        ids += encode(tokenizer, doc)
        if len(ids) >= budget:
            break
    if not ids:
        raise DataError(f"--data {' '.join(cfg.data)}: no text to build haystacks from")
    return Filler(tokenizer, ids=ids[:budget])


def default_tasks():
    """The eval package's passkey and key-value tasks (``consa-vllm eval`` measures the same ones)."""
    from consa_vllm.eval.tasks import KV, PASSKEY

    return [PASSKEY, KV]


def train_duo(cfg: TrainConfig, tasks: Sequence | None = None) -> Allocation:
    """Learn DuoAttention gates on ``tasks`` (default: :func:`default_tasks`) and write the allocation.

    ``tasks`` (a list of :class:`consa_vllm.eval.tasks.TaskSpec`) lets a caller use tasks that fit
    its tokenizer (e.g. the symbolic task of a word-level test model).
    """
    from .dist import Parallel
    from .loop import first_missing, load_model, load_tokenizer, patch_model, remove_earlier_run

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--method duo runs in one process (it learns one gate per KV head with frozen weights); "
                          "run it without torchrun")
    device = Parallel.from_env(cfg.device, fsdp=False).device
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg)
    filler = read_filler(cfg, tok)
    tasks = list(tasks) if tasks is not None else default_tasks()
    # Check the documents fit before loading the model: one clear line for a too-short --seq-len.
    duo_batch(tasks, tok, filler, cfg.seq_len, cfg.window, cfg.sink, 1, cfg.seed, 0)
    model = load_model(cfg, device)
    model.requires_grad_(False)
    model.eval()  # no dropout: the teacher and the student must see the same function
    try:
        state = patch_model(model, cfg.window, cfg.sink)
    except ValueError as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from None
    # DuoAttention starts every gate at 1 (all full attention: student == teacher at step 0).
    alpha = torch.ones(state.num_layers, state.num_kv_heads, device=device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=cfg.gate_lr)
    log_dir = cfg.log_path
    remove_earlier_run(cfg)  # --force over an earlier run (of either method): none of its files stay
    made_log_root = first_missing(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    t0 = time.time()
    with _discard_if_empty(log_dir, made_log_root, history), open(log_dir / "metrics.jsonl", "w") as metrics:
        for step in range(cfg.steps):
            sums = torch.zeros(2)
            for m in range(cfg.grad_accum):
                ids, mask = duo_batch(tasks, tok, filler, cfg.seq_len, cfg.window, cfg.sink, cfg.batch_size,
                                      cfg.seed, step * cfg.grad_accum + m)
                ids, mask = ids.to(device), mask.to(device)
                with torch.no_grad():
                    state.set_gates(None)  # no allocation set: all heads full, the dense teacher
                    teacher = last_hidden(model, ids)
                state.set_gates(alpha)
                distill = distill_loss(last_hidden(model, ids), teacher, mask)
                l1 = alpha.mean()
                ((distill + cfg.duo_l1 * l1) / cfg.grad_accum).backward()
                sums += torch.stack([distill.detach().float().cpu(), l1.detach().float().cpu()])
            sums /= cfg.grad_accum
            if not torch.isfinite(sums).all():
                raise TrainingDiverged(f"--method duo: distillation loss became {sums[0].item()} at step {step}; "
                                       "try a lower --gate-lr or --dtype float32")
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            rec = {"step": step, "distill": sums[0].item(), "mean_gate": sums[1].item(),
                   "loss": sums[0].item() + cfg.duo_l1 * sums[1].item(), "seconds": round(time.time() - t0, 3)}
            history.append(rec)
            metrics.write(json.dumps(rec) + "\n")
    state.set_gates(None)
    gates = alpha.detach().float().cpu().tolist()
    alloc = duo_allocation(gates, cfg.target_sparsity, cfg.window, cfg.sink, cfg.constraint)
    alloc = alloc.with_extra(
        target_sparsity=cfg.target_sparsity, achieved_sparsity=alloc.sparsity,
        num_layers=state.num_layers, num_kv_heads=state.num_kv_heads,
        training={
            "trainer": "consa_vllm.train", "method": "duo",
            "objective": "MSE of the last hidden states (after the final norm) against the all-full model at "
                         "the answer-predicting positions + duo_l1 x mean gate; gates clipped to [0, 1]",
            "rule": "import-duo's quantile rule (consa_vllm.allocation.duo.duo_allocation), constraint "
                    + cfg.constraint,
            "tasks": [t.name for t in tasks], "args": cfg.to_dict(), "stage1_steps": cfg.steps,
            "tokens_stage1": cfg.steps * cfg.grad_accum * cfg.batch_size * cfg.seq_len,
            "final": history[-1] if history else {}, "duration_s": round(time.time() - t0, 3), "gates": gates,
        })
    alloc.save(cfg.out)
    from consa_vllm.allocation import plot_allocation, render_text

    from .plots import plot_curves
    # The package's one heatmap, with the learned gates in its second panel.
    plot_allocation(alloc, log_dir / "allocation.png", title=Path(cfg.out).name, probabilities=gates)
    plot_curves(history, log_dir / "curves.png")
    if cfg.progress:
        print(render_text(alloc), file=sys.stderr)
    print(f"allocation: {cfg.out}\nlogs and plots: {log_dir}", file=sys.stderr)
    return alloc


@contextmanager
def _discard_if_empty(log_dir: Path, made_root: Path | None, history: list) -> Iterator[None]:
    """A run stopped before its first step leaves no logs (:func:`discard_empty_logs`)."""
    try:
        yield
    except BaseException:
        if not history:
            from .loop import discard_empty_logs

            discard_empty_logs(log_dir, made_root)
        raise


def gates_of(path: str | Path) -> list[list[float]]:
    """The learned gates recorded in a ``--method duo`` allocation file."""
    alloc = Allocation.load(path)
    return (alloc.model_extra or {})["training"]["gates"]
