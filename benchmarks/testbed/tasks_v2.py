"""Held-out retrieval formats of testbed version 2, after RULER (Hsieh et al., 2024).

Pretraining (and every allocation's training) shows the model only the ``kv`` and ``passkey``
presets of :mod:`consa_vllm.eval.tasks`. These three formats never appear there:

- ``multikey``: RULER's MK-NIAH, "The special magic number for {key} is: {value}." among 7
  distractor needles of the same form; the query names one key.
- ``multivalue``: RULER's MV-NIAH, one key with 3 values in 3 needles at 3 depths; the answer
  is every value, in document order ("v1, v2, v3"): all three needles must be read.
- ``vartrack``: RULER's variable tracking, a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of 4
  hops spread over the context, plus one distractor chain; the query asks for the last variable
  of the chain, so the answer needs every hop.

Pretraining does teach the three *structures*, in templates of their own
(:func:`training_task_document`): run 1 on the H200 showed that a 55.6 M model shown only
``kv`` and ``passkey`` answers none of the held-out formats, dense attention included, so no
allocation could be told apart. What stays held out is the surface: the eval's wording
(``special magic number``, ``They are:``), syntax (``VAR A = VAR B``) and names (upper-case
variables, 7-digit values) never occur in the training templates (:data:`HELDOUT_WORDS`; the
filler, code in both, may hold any word).

Every sample is :class:`consa_vllm.eval.tasks.Sample` (scored by ``score_retrieval``), exactly
``context`` tokens, deterministic by seed. ``distance`` is that of the *closest* needle the
answer needs, so ``beyond_window`` means a sliding-window head can see none of them; needles
the answer needs sit at depths in [depth, 0.8] of the filler, so every one of them is at least a
fifth of the context before the query (>= 1,600 tokens, 3 windows of 512, at 8k), and depths
<= 0.5 put the first one half the context away or more.
"""

from __future__ import annotations

import random
from typing import Sequence

from consa_vllm.eval.tasks import Filler, Sample, encode, sample_grid

TASKS = ("multikey", "multivalue", "vartrack")


def _word(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def compose(filler: Filler, context: int, pieces: list[tuple[float, list[int], bool]], query: list[int],
            rng: random.Random) -> tuple[list[int], int, int]:
    """Filler with ``pieces`` ``(depth, ids, needed)`` inserted at their depths, then ``query``.

    Returns ``(ids, distance, needle_tokens)``: exactly ``context`` ids, the distance (from its
    first token to the last prompt token) of the closest *needed* piece and that piece's length
    (:class:`consa_vllm.eval.tasks.Sample`'s fields). Pieces keep their list order at equal depths.
    """
    n_fill = context - len(query) - sum(len(p) for _, p, _ in pieces)
    if n_fill < 0:
        raise ValueError(f"context {context} is too short for {len(pieces)} needles and the query")
    fill = filler.take(n_fill, rng)
    order = sorted(range(len(pieces)), key=lambda i: (round(pieces[i][0] * n_fill), i))
    ids: list[int] = []
    prev, starts = 0, {}
    for i in order:
        at = round(pieces[i][0] * n_fill)
        ids += fill[prev:at]
        starts[i] = len(ids)
        ids += pieces[i][1]
        prev = at
    ids += fill[prev:] + query
    closest = max((i for i, (_, _, need) in enumerate(pieces) if need), key=lambda i: starts[i])
    return ids, context - 1 - starts[closest], len(pieces[closest][1])


def _depths(rng: random.Random, first: float, n: int) -> list[float]:
    """``first`` and ``n - 1`` more depths, increasing, in (first, 0.8]."""
    rest = sorted(rng.uniform(first, 0.8) for _ in range(n - 1))
    return [first] + rest


def make_task_sample(task: str, tokenizer, filler: Filler, context: int, depth: float, rng: random.Random,
                     window: int, sink: int = 0) -> Sample:
    """One sample of ``task`` (module docstring), its first needle at ``depth``."""
    enc = lambda s: encode(tokenizer, s)  # noqa: E731
    if task == "multikey":
        keys = []
        while len(keys) < 8:
            k = _word(rng)
            if k not in keys:
                keys.append(k)
        values = [_number(rng) for _ in keys]
        needle = "\nThe special magic number for {} is: {}.\n"
        spots = [depth] + [rng.uniform(0.0, 0.9) for _ in keys[1:]]
        pieces = [(d, enc(needle.format(k, v)), i == 0) for i, (d, k, v) in enumerate(zip(spots, keys, values))]
        query = enc(f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:")
        answer = f" {values[0]}"
    elif task == "multivalue":
        key = _word(rng)
        values = [_number(rng) for _ in range(3)]
        pieces = [(d, enc(f"\nOne of the special magic numbers for {key} is: {v}.\n"), True)
                  for d, v in zip(_depths(rng, depth, 3), values)]
        query = enc(f"\nWhat are all the special magic numbers for {key}? They are:")
        answer = " " + ", ".join(values)
    elif task == "vartrack":
        names = []
        while len(names) < 8:
            n = _word(rng, 4).upper()
            if n not in names:
                names.append(n)
        chain, other = names[:4], names[4:]
        value, decoy = _number(rng, 5), _number(rng, 5)
        lines = [f"\nVAR {chain[0]} = {value}\n"] + [f"\nVAR {b} = VAR {a}\n" for a, b in zip(chain, chain[1:])]
        decoys = [f"\nVAR {other[0]} = {decoy}\n"] + [f"\nVAR {b} = VAR {a}\n" for a, b in zip(other, other[1:])]
        pieces = [(d, enc(t), True) for d, t in zip(_depths(rng, depth, 4), lines)]
        pieces += [(d, enc(t), False) for d, t in zip(sorted(rng.uniform(0.0, 0.9) for _ in decoys), decoys)]
        query = enc(f"\nassert VAR {chain[-1]} ==")
        answer = f" {value}"
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    ids, distance, needle_tokens = compose(filler, context, pieces, query, rng)
    return Sample(task=task, prompt_ids=ids, answer_ids=enc(answer), answer=answer, context=context, depth=depth,
                  distance=distance, window=window, sink=sink, needle_tokens=needle_tokens)


def make_task_samples(tasks: Sequence[str], tokenizer, filler: Filler, contexts: Sequence[int],
                      depths: Sequence[float], per_cell: int, seed: int, window: int, sink: int = 0) -> list[Sample]:
    """``per_cell`` samples per (task, context, depth), deterministic in ``seed`` (same prompts for every allocation)."""
    return sample_grid(tasks, contexts, depths, per_cell, seed,
                       lambda i, c, d, rng: make_task_sample(tasks[i], tokenizer, filler, c, d, rng, window, sink))


# ------------------------------------------------------------------ the structures, in training templates

#: Words of the held-out formats above that no training template contains.
HELDOUT_WORDS = ("special", "magic", "number", "VAR", "They are")
#: What a training key holds (one per document): none is a held-out word.
TRAIN_NOUNS = ("code", "pin", "id", "serial", "ticket", "port", "seat", "badge", "locker", "account")


def training_instances(task: str, rng: random.Random) -> tuple[list[tuple[float, str]], list[tuple[str, str]]]:
    """One training document's needles and questions for ``task``, as text.

    Returns ``(pieces, qa)``: ``pieces`` are ``(depth, text)`` with depths in [0, 0.6] (needles
    at least 40% of the filler before the questions), in document order where order matters;
    ``qa`` are ``(question, answer)`` pairs asked after the filler. The structures are those of
    :func:`make_task_sample`; the wording is not (:data:`HELDOUT_WORDS`):

    - ``multikey``: 8 keys ``The {noun} of {key} is {value}.``, 4 of them asked ``The {noun} of {key} is``;
    - ``multivalue``: 2 keys with 3 values each ``One {noun} of {key} is {value}.``, both asked
      ``Every {noun} of {key}:``, answer the values in document order, joined by ", ";
    - ``vartrack``: 2 chains of 4 lower-case names in Python syntax (``a = 12345``, ``b = a``, ...),
      both asked ``assert {last} ==``.
    """
    noun = rng.choice(TRAIN_NOUNS)

    def words(n: int, length: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            w = _word(rng, length)
            if w not in out:
                out.append(w)
        return out

    def depths(n: int) -> list[float]:
        return sorted(rng.uniform(0.0, 0.6) for _ in range(n))

    if task == "multikey":
        keys = words(8, 5)
        values = [_number(rng, 6) for _ in keys]
        pieces = [(rng.uniform(0.0, 0.6), f"\nThe {noun} of {k} is {v}.\n") for k, v in zip(keys, values)]
        asked = rng.sample(range(len(keys)), 4)
        qa = [(f"\nThe {noun} of {keys[i]} is", f" {values[i]}") for i in asked]
    elif task == "multivalue":
        pieces, qa = [], []
        for key in words(2, 5):
            values = [_number(rng, 6) for _ in range(3)]
            pieces += [(d, f"\nOne {noun} of {key} is {v}.\n") for d, v in zip(depths(3), values)]
            qa.append((f"\nEvery {noun} of {key}:", " " + ", ".join(values)))
        pieces.sort(key=lambda p: p[0])  # stable: one key's values keep their order at equal depths
    elif task == "vartrack":
        names = words(8, 4)
        pieces, qa = [], []
        for chain in (names[:4], names[4:]):
            value = _number(rng, 5)
            lines = [f"\n{chain[0]} = {value}\n"] + [f"\n{b} = {a}\n" for a, b in zip(chain, chain[1:])]
            pieces += list(zip(depths(4), lines))
            qa.append((f"\nassert {chain[-1]} ==", f" {value}"))
        pieces.sort(key=lambda p: p[0])
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    rng.shuffle(qa)
    return pieces, qa


def training_task_document(task: str, tokenizer, filler: Filler, length: int,
                           rng: random.Random) -> tuple[list[int], list[bool]]:
    """Token ids (exactly ``length``) of one training document of ``task`` and its answer mask.

    The needles of :func:`training_instances` among filler, then its questions, each after 1-8
    filler tokens and followed by its answer; the mask is True at the answer tokens.
    """
    enc = lambda s: encode(tokenizer, s)  # noqa: E731
    pieces, qa = training_instances(task, rng)
    tail: list[int] = []
    tail_mask: list[bool] = []
    for question, answer in qa:
        gap, q, a = filler.take(rng.randint(1, 8), rng), enc(question), enc(answer)
        tail += gap + q + a
        tail_mask += [False] * (len(gap) + len(q)) + [True] * len(a)
    ids, _, _ = compose(filler, length, [(d, enc(text), True) for d, text in pieces], tail, rng)
    return ids, [False] * (length - len(tail)) + tail_mask


def make_training_sample(task: str, tokenizer, filler: Filler, context: int, rng: random.Random,
                         window: int) -> Sample:
    """An in-template prompt: :func:`training_instances`' needles and its first question, exactly
    ``context`` tokens. Accuracy on these is retrieval in the wording pretraining used: what an
    allocation keeps of it, and (dense) whether the structure was learned at all."""
    enc = lambda s: encode(tokenizer, s)  # noqa: E731
    pieces, qa = training_instances(task, rng)
    question, answer = qa[0]
    ids, distance, needle_tokens = compose(filler, context, [(d, enc(text), True) for d, text in pieces],
                                           enc(question), rng)
    return Sample(task=f"{task}-train", prompt_ids=ids, answer_ids=enc(answer), answer=answer, context=context,
                  depth=min(d for d, _ in pieces), distance=distance, window=window, needle_tokens=needle_tokens)
