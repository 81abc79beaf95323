"""Small-model training for the testbed: build a Qwen3-shaped model, train its weights on token batches.

One loop serves pretraining (dense attention, HF SDPA) and stage 2 (the model patched with a
fixed allocation by :func:`consa_vllm.reference.patch_model`). The loss is the LM loss plus
``answer_weight`` times the mean loss of the retrieval answer tokens: those are a few tokens
per sequence, and weighting them is what makes a small model learn retrieval in minutes.
The allocation itself is learned by the project's trainer (``consa_vllm.train``), not here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from consa_vllm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def build_model(shape: dict, seed: int, dtype: str = "float32"):
    """A randomly initialised Qwen3 causal LM of ``shape`` (Qwen3Config keyword arguments)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def lm_loss_weighted(model, ids: torch.Tensor, answer_mask: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """LM loss + ``answer_weight`` x the mean loss at answer positions (``answer_mask`` [B, T], target side),
    plus a mixture-of-experts model's load-balancing loss (``router_aux_loss_coef`` x ``aux_loss``) when
    its config asks the forward for router logits."""
    out = model(input_ids=ids)
    logits = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    loss = nll.mean()
    m = answer_mask[:, 1:]
    if answer_weight and m.any():
        loss = loss + answer_weight * nll[m].mean()
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


def train_lm(model, batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float, *,
             warmup: int = 0, answer_weight: float = 0.0, device: str = "cpu", autocast_dtype: str | None = None,
             grad_clip: float = 1.0, log_every: int = 50, log: Callable[[dict], None] | None = None,
             ckpt_dir: Path | None = None, ckpt_every: int = 0, max_seconds: float | None = None) -> dict:
    """Train all weights for ``steps`` AdamW steps (cosine schedule after ``warmup``); resumable.

    ``batch_fn(step)`` returns ``(ids [B, T], answer_mask [B, T])`` and must be a pure function of
    ``step``, so that a resumed run sees the same batches. With ``ckpt_dir`` the state is saved
    every ``ckpt_every`` steps and when ``max_seconds`` runs out; the next call resumes there.
    The state (weights, optimizer, schedule) is written as the trainer writes its checkpoints
    (:mod:`consa_vllm.train.checkpoint`: tensors in safetensors, the rest in JSON, no pickle);
    ``ckpt_dir`` is removed once training is done.
    Steps with a non-finite loss or gradient are skipped (logged with ``"skipped"``, the count in
    this call). Returns ``{"done": bool, "step": int, "last_loss": float, "skipped": int}``.
    """
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    step, t0, loss_val, skipped = 0, time.time(), float("nan"), 0
    ckpt_root = Path(ckpt_dir) if ckpt_dir else None
    latest = latest_checkpoint(ckpt_root) if ckpt_root else None
    if latest is not None:
        step, st = load_checkpoint(latest)  # tensors come back on the CPU; load_state_dict moves them
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])

    def save() -> None:
        if ckpt_root:
            save_checkpoint(ckpt_root, step, {"model": model.state_dict(), "opt": opt.state_dict(),
                                              "sched": sched.state_dict()}, keep=1)

    amp = torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, autocast_dtype)) \
        if autocast_dtype else None
    while step < steps:
        ids, mask = batch_fn(step)
        ids, mask = ids.to(device), mask.to(device)
        if amp is not None:
            with amp:
                loss = lm_loss_weighted(model, ids, mask, answer_weight)
        else:
            loss = lm_loss_weighted(model, ids, mask, answer_weight)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
        # A step whose loss or gradient is not finite is skipped, not applied: one such step in
        # bf16 would turn every weight into NaN and lose the lease's pretraining (session 4's 8k
        # run went NaN at step 475). The schedule still advances, so the batches stay a function
        # of the step. The check syncs once per step: a few ms against steps of 0.2 s and more.
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if finite:
            opt.step()
        else:
            skipped += 1
            if log:
                log({"step": step + 1, "loss": None, "skipped": skipped, "seconds": time.time() - t0})
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        due = finite and (step % log_every == 0 or step == steps)  # a skipped step was logged above
        loss_val = loss.item() if due else loss_val
        if log and due:
            log({"step": step, "loss": loss_val, "lr": sched.get_last_lr()[0], "seconds": time.time() - t0})
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            save()
        if max_seconds is not None and time.time() - t0 > max_seconds and step < steps:
            save()
            return {"done": False, "step": step, "last_loss": loss_val, "skipped": skipped}
    if ckpt_root:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    model.eval()
    return {"done": True, "step": step, "last_loss": loss_val, "skipped": skipped}


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (the allocation module's writer)."""
    from consa_vllm.allocation import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
