"""Metrics through the reference attention: LM loss by distance beyond the window, retrieval accuracy.

Both run any HF causal LM patched by :func:`consa_vllm.reference.patch_model` with an
allocation (or all-F, the dense model). Retrieval is scored by teacher forcing: the answer
is correct when the argmax at every answer position is the answer token, which is exactly
"greedy decoding starts with the answer", at the cost of one forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from .tasks import Sample


def position_buckets(window: int, length: int) -> list[tuple[int, int]]:
    """Target-position ranges ``[lo, hi)``: ``[1, W+1)``, ``[W+1, 2W+1)``, ``[2W+1, 3W+1)``,
    ``[3W+1, 5W+1)``, ``[5W+1, 9W+1)``, ... (the last one cut at ``length``).

    The token at position ``t`` is predicted from positions ``0..t-1``; an S head there sees the
    last W of them, so targets at ``t <= W`` lose nothing to the window and a target at
    ``t`` has ``t - W`` context tokens that only F heads see: the buckets hold 0, 1..W,
    W+1..2W, 2W+1..4W, ... such tokens (doubling after the first window).
    """
    # In "tokens beyond the window" b = t - W: 0 | 1..W | W+1..2W | 2W+1..4W | ... (doubling).
    edges, b = [1, window + 1], window
    while edges[-1] < length:
        edges.append(min(length, window + 1 + b))
        b *= 2
    return [(lo, min(hi, length)) for lo, hi in zip(edges, edges[1:]) if lo < length]


def eval_attention_backends():
    """The SDPA backends of the eval's forward passes: every one PyTorch has except cuDNN attention.

    Why: on Hopper GPUs PyTorch picks cuDNN attention first, and cuDNN builds an execution plan
    for every new input shape. The eval's prompts come in many lengths, and the reference's
    binary mode calls SDPA on each layer's F heads and S heads apart (for an uneven allocation,
    a different head count in nearly every layer), so most of its calls are a new shape and the
    plans, not the attention, take the time. Measured on an H200 (torch 2.11, cuDNN 9.19;
    ``benchmarks/results/reference_sdpa_h200.json``): 8 new lengths of the testbed's model took
    2.0-4.2 s with cuDNN and 0.37-0.57 s without; once every shape has its plan cuDNN is 10-20%
    faster (0.30-0.50 s against 0.36-0.56 s), which the eval, with new lengths all the time, never sees.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def lm_loss(model, sequences: "torch.Tensor", window: int, batch_size: int = 8) -> dict[str, Any]:
    """Mean next-token NLL (nats) over ``sequences`` ``[N, T]``, overall and by distance beyond the window.

    Bucket ``beyond_window = [a, b)`` holds targets with ``a..b-1`` context tokens outside the window.
    ``loss_beyond_window_per_sequence``: each sequence's mean beyond the window (empty when no
    target is), for intervals over sequences.
    """
    import torch

    device = next(model.parameters()).device
    T = sequences.shape[1]
    nll_sum = torch.zeros(T, dtype=torch.float64)
    count = torch.zeros(T, dtype=torch.float64)
    per_sequence: list[float] = []  # mean NLL beyond the window, one per sequence (for paired intervals)
    model.eval()
    with torch.no_grad(), eval_attention_backends():
        for i in range(0, sequences.shape[0], batch_size):
            x = sequences[i:i + batch_size].to(device)
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            nll_sum[1:] += nll.double().sum(0).cpu()
            if T - 1 > window:  # column c predicts position c + 1: beyond the window from c = window
                per_sequence += nll[:, window:].double().mean(1).cpu().tolist()
            count[1:] += x.shape[0]
    return loss_report(nll_sum.tolist(), count.tolist(), per_sequence, window, int(sequences.shape[0]))


def loss_report(nll_sum: Sequence[float], count: Sequence[float], per_sequence: list[float], window: int,
                sequences: int) -> dict[str, Any]:
    """The report of :func:`lm_loss` (also the served model's) from sums by target position.

    ``nll_sum[t]`` and ``count[t]``: the summed NLL and the number of targets at position ``t``
    (``t = 0`` has none), over ``sequences`` sequences of ``len(nll_sum)`` tokens;
    ``per_sequence``: each sequence's mean NLL beyond the window.
    """
    T = len(nll_sum)
    buckets = []
    for lo, hi in position_buckets(window, T):
        n = sum(count[lo:hi])
        buckets.append({"positions": [lo, hi], "beyond_window": [max(0, lo - window), max(0, hi - window)],
                        "tokens": int(n), "loss": sum(nll_sum[lo:hi]) / n})
    total = sum(count)
    beyond = sum(count[window + 1:])  # targets t > W: at least one context token outside the window
    return {"loss": sum(nll_sum) / total, "tokens": int(total),
            "loss_beyond_window": sum(nll_sum[window + 1:]) / beyond if beyond else None,
            "window": window, "seq_len": T, "sequences": sequences, "buckets": buckets,
            "loss_beyond_window_per_sequence": per_sequence}


def score_retrieval(model, samples: Sequence["Sample"], batch_size: int = 8) -> list[bool]:
    """Per sample: does greedy decoding start with the answer ids (teacher-forced check)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].prompt_ids), len(samples[i].answer_ids)))
    correct = [False] * len(samples)
    with torch.no_grad(), eval_attention_backends():
        i = 0
        while i < len(order):
            # Batch samples of one prompt length. Answers of different lengths are padded on the
            # right: attention is causal (a window and sinks too), so a row's positions never see
            # the padding after them, and no attention mask is needed (SDPA keeps its flash path).
            n = len(samples[order[i]].prompt_ids)
            group = []
            while i < len(order) and len(group) < batch_size and len(samples[order[i]].prompt_ids) == n:
                group.append(order[i])
                i += 1
            keep = max(len(samples[j].answer_ids) for j in group)
            rows = []
            for j in group:
                a = samples[j].answer_ids
                rows.append(samples[j].prompt_ids + a[:-1] + [a[-1]] * (keep - len(a)))
            x = torch.tensor(rows, device=device)
            # Row j's answer is predicted at positions n-1 .. n-2+len(answer), the first of the
            # last ``keep`` positions: only those logits are computed (not [batch, 8k, vocab]).
            pred = model(input_ids=x, logits_to_keep=keep).logits.argmax(-1).cpu()
            for row, j in enumerate(group):
                a = samples[j].answer_ids
                correct[j] = pred[row, :len(a)].tolist() == a
    return correct


def summarize_retrieval(samples: Sequence["Sample"], correct: Sequence[bool]) -> dict[str, Any]:
    """Accuracy overall, beyond the window, and per task x context x depth."""
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for s, ok in zip(samples, correct):
        cells[(s.task, s.context, s.depth)].append(bool(ok))
    beyond = [bool(ok) for s, ok in zip(samples, correct) if s.beyond_window]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for s, ok in zip(samples, correct):
        by_task[s.task].append(bool(ok))
    return {
        "accuracy": sum(map(bool, correct)) / len(correct) if correct else None,
        "samples": len(correct),
        "accuracy_beyond_window": sum(beyond) / len(beyond) if beyond else None,
        "samples_beyond_window": len(beyond),
        "by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())},
        "cells": [{"task": t, "context": c, "depth": d, "accuracy": sum(v) / len(v), "samples": len(v),
                   "mean_distance": sum(s.distance for s in samples if (s.task, s.context, s.depth) == (t, c, d))
                   / len(v)}
                  for (t, c, d), v in sorted(cells.items())],
    }
