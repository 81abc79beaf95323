"""Synthetic long-context retrieval tasks, built on any tokenizer, deterministic by seed.

A task is a *needle* (``"{key} = {value}"``), a *query* (``"assert {key} =="``) and an
*answer* (``" {value}"``). A sample is token ids: filler, the needle at a controlled
depth, more filler (with distractor needles for key-value retrieval), and the query at the
very end; the model must continue with the answer. Every piece is tokenized on its own and
the ids are concatenated, so the prompt length and the needle's distance are exact in
tokens for any tokenizer; the prompt is passed on as ids (HF, or vLLM's OpenAI API, which
accepts a list of token ids as the prompt).

Distance: ``distance`` is the number of tokens from the needle's first token to the last
prompt token ``i`` (the position that predicts the first answer token). A sliding-window
head with window W at ``i`` sees keys ``i-W+1 .. i``, so it sees none of the needle once its
*last* token is ``W`` or more tokens back: ``distance - (needle_tokens - 1) >= W``. With
``sink`` attention-sink tokens it also sees keys ``0 .. sink-1``, so the needle must also
start at or after ``sink``. Both hold: ``beyond_window``.

The same generator writes *training documents* (:func:`training_document`): several
needles early, their queries later, at distances the caller sets, so that a model trained
on them must retrieve beyond the window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Classic passkey filler (Mohtashami & Jaggi 2023), used when no corpus is given.
DEFAULT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")


class TaskSpec(BaseModel):
    """One retrieval task: text templates and how keys and values are drawn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    needle: str = Field(description="template with {value} and optionally {key}")
    query: str = Field(description="template with {key} (or none, for passkey)")
    answer: str = Field(description="template with {value}: the expected continuation")
    keys: list[str] | None = Field(default=None, description="explicit key words; default: key_prefix + letters")
    values: list[str] | None = Field(default=None, description="explicit value words; default: value_digits digits")
    key_prefix: str = "k_"
    key_letters: int = Field(default=4, ge=1)
    value_digits: int = Field(default=5, ge=1)
    distractors: int = Field(default=0, ge=0, description="other needles (other keys) spread in the filler")

    @model_validator(mode="after")
    def _templates(self) -> "TaskSpec":
        if "{value}" not in self.needle or "{value}" not in self.answer:
            raise ValueError(f"task {self.name!r}: needle and answer must contain {{value}}")
        if self.distractors and "{key}" not in self.query:
            raise ValueError(f"task {self.name!r}: distractors need a {{key}} in the query")
        for name in ("keys", "values"):
            words = getattr(self, name)
            if words is not None and len(set(words)) < 2:
                raise ValueError(f"task {self.name!r}: {name} needs at least 2 distinct words")
        if self.keys is not None and self.distractors >= len(self.keys):
            raise ValueError(f"task {self.name!r}: {self.distractors} distractors need more than "
                             f"{len(self.keys)} keys")
        return self

    def draw_keys(self, rng: random.Random, n: int) -> list[str]:
        """``n`` distinct keys."""
        if self.keys is not None:
            return rng.sample(self.keys, n)
        out: list[str] = []
        while len(out) < n:
            k = self.key_prefix + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.key_letters))
            if k not in out:
                out.append(k)
        return out

    def draw_value(self, rng: random.Random) -> str:
        """One value (values of different needles may repeat)."""
        if self.values is not None:
            return rng.choice(self.values)
        first = str(rng.randrange(1, 10))
        return first + "".join(str(rng.randrange(10)) for _ in range(self.value_digits - 1))


#: Passkey retrieval (one needle, no key).
PASSKEY = TaskSpec(name="passkey",
                   needle="\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
                   query="\nWhat is the pass key? The pass key is", answer=" {value}")
#: Key-value retrieval in Python syntax, with distractor assignments.
KV = TaskSpec(name="kv", needle="\n{key} = {value}\n", query="\nassert {key} ==", answer=" {value}",
              distractors=3)
PRESETS: dict[str, TaskSpec] = {t.name: t for t in (PASSKEY, KV)}


class Filler:
    """A stream of filler token ids (a corpus, or the default sentences), cut at random offsets."""

    def __init__(self, tokenizer, texts: Sequence[str] | None = None, min_tokens: int = 0,
                 ids: Sequence[int] | None = None):
        """Tokenize ``texts`` (default: the passkey sentences), or take pre-tokenized ``ids`` (a list or array)."""
        if ids is None:
            ids = []
            for text in (texts or [DEFAULT_FILLER]):
                ids.extend(encode(tokenizer, text))
        if len(ids) == 0:
            raise ValueError("filler texts tokenize to nothing")
        ids = list(ids) if len(ids) < max(min_tokens, 1) else ids
        while len(ids) < max(min_tokens, 1):  # repeat short sources (the default sentences)
            ids = ids + ids
        self.ids = ids

    def take(self, n: int, rng: random.Random) -> list[int]:
        """``n`` consecutive filler ids from a random offset (wrapping around)."""
        if n <= 0:
            return []
        if len(self.ids) < n:
            self.ids = list(self.ids)
            while len(self.ids) < n:
                self.ids = self.ids + self.ids
        start = rng.randrange(len(self.ids))
        out = [int(i) for i in self.ids[start:start + n]]
        return out + [int(i) for i in self.ids[: n - len(out)]]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS/EOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Sample:
    """One retrieval prompt (token ids) and its expected answer."""

    task: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    context: int  # target prompt length in tokens (== len(prompt_ids))
    depth: float  # requested needle depth: 0 = start of the prompt, 1 = just before the query
    distance: int  # tokens from the needle's first token to the last prompt token
    window: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sink: int = 0  # attention-sink tokens of the S heads: they also see prompt tokens 0..sink-1
    needle_tokens: int = 1  # the needle's length: its last token is distance - (needle_tokens - 1) back

    @property
    def beyond_window(self) -> bool | None:
        """Whether a sliding-window head at the query sees no token of the needle, in its window or its sinks."""
        if self.window is None:
            return None
        needle_at = self.context - 1 - self.distance
        return self.distance - (self.needle_tokens - 1) >= self.window and needle_at >= self.sink


def make_sample(task: TaskSpec, tokenizer, filler: Filler, context: int, depth: float, rng: random.Random,
                window: int | None = None, sink: int = 0) -> Sample:
    """A prompt of exactly ``context`` tokens with the needle at ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    keys = task.draw_keys(rng, 1 + task.distractors)
    value = task.draw_value(rng)
    needle = encode(tokenizer, task.needle.format(key=keys[0], value=value))
    query = encode(tokenizer, task.query.format(key=keys[0]))
    answer_text = task.answer.format(value=value)
    answer = encode(tokenizer, answer_text)
    others = [encode(tokenizer, task.needle.format(key=k, value=task.draw_value(rng))) for k in keys[1:]]
    n_fill = context - len(needle) - len(query) - sum(len(o) for o in others)
    if n_fill < 0:
        raise ValueError(f"context {context} is too short for task {task.name!r} "
                         f"(needles and query take {context - n_fill} tokens)")
    fill = filler.take(n_fill, rng)
    # Distractors at random cut points of the filler; the needle at its depth.
    cut = round(depth * n_fill)
    pieces: list[tuple[int, list[int]]] = [(cut, needle)] + [(rng.randrange(n_fill + 1), o) for o in others]
    pieces.sort(key=lambda p: (p[0], p[1] is not needle))
    ids: list[int] = []
    prev, needle_at = 0, -1
    for at, piece in pieces:
        ids += fill[prev:at]
        if piece is needle and needle_at < 0:
            needle_at = len(ids)
        ids += piece
        prev = at
    ids += fill[prev:] + query
    assert len(ids) == context
    return Sample(task=task.name, prompt_ids=ids, answer_ids=answer, answer=answer_text, context=context,
                  depth=depth, distance=context - 1 - needle_at, window=window, sink=sink,
                  needle_tokens=len(needle))


def sample_grid(task_names: Sequence[str], contexts: Sequence[int], depths: Sequence[float], per_cell: int,
                seed: int, make: Callable[[int, int, float, random.Random], Sample]) -> list[Sample]:
    """``per_cell`` samples ``make(task_index, context, depth, rng)`` for every (task,
    context, depth), in that order; each cell's ``rng`` is seeded by ``seed``, the task's
    name, the context and the depth, so a cell's prompts do not depend on the others."""
    out = []
    for i, name in enumerate(task_names):
        for c in contexts:
            for d in depths:
                rng = random.Random(f"{seed}/{name}/{c}/{d}")
                out += [make(i, c, d, rng) for _ in range(per_cell)]
    return out


def make_samples(tasks: Sequence[TaskSpec], tokenizer, filler: Filler, contexts: Sequence[int],
                 depths: Sequence[float], per_cell: int, seed: int, window: int | None = None,
                 sink: int = 0) -> list[Sample]:
    """``per_cell`` samples for every (task, context, depth); deterministic in ``seed``."""
    return sample_grid([t.name for t in tasks], contexts, depths, per_cell, seed,
                       lambda i, c, d, rng: make_sample(tasks[i], tokenizer, filler, c, d, rng, window, sink))


def training_document(task: TaskSpec, tokenizer, filler: Filler, length: int, rng: random.Random,
                      num_needles: int, min_distance: int, max_filler_gap: int = 8,
                      sink: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids (exactly ``length``) of one training document rich in retrieval, and its answer mask.

    ``num_needles`` needles with distinct keys sit in the first part, among filler, none in
    the first ``sink`` tokens; then their queries, each followed by its answer, in random
    order, separated by short filler runs (1..``max_filler_gap`` tokens). Every query's last
    token lies at least ``min_distance`` tokens after its needle's *last* token. With
    ``min_distance`` = the window W and ``sink`` = the S heads' sinks, a sliding-window head at
    the query sees no token of the needle (keys ``q-W+1 .. q`` and ``0 .. sink-1``): only full
    attention can answer. Queries that do not fit in ``length`` are dropped. The mask is True
    at the answer tokens (a pretraining loop may weight them: they are the only tokens that
    need retrieval).
    """
    keys = task.draw_keys(rng, num_needles)
    values = [task.draw_value(rng) for _ in keys]
    needles = [encode(tokenizer, task.needle.format(key=k, value=v)) for k, v in zip(keys, values)]
    qa = [encode(tokenizer, task.query.format(key=k)) + encode(tokenizer, task.answer.format(value=v))
          for k, v in zip(keys, values)]
    hay = max(sum(map(len, needles)) + sink, length // 2)
    n_fill = hay - sum(map(len, needles))
    # Cut points at or after the sink: the needles start there, past what S heads always see.
    cuts = sorted(rng.randrange(sink, n_fill + 1) for _ in needles)
    fill = filler.take(n_fill, rng)
    ids: list[int] = []
    answers: list[int] = []  # positions of answer tokens
    starts: list[int] = []
    prev = 0
    for at, piece in zip(cuts, needles):
        ids += fill[prev:at]
        starts.append(len(ids))
        ids += piece
        prev = at
    ids += fill[prev:]
    order = list(range(num_needles))
    rng.shuffle(order)
    for i in order:
        gap = filler.take(rng.randint(1, max_filler_gap), rng)
        # Push the query's last token out to min_distance from the needle's last token with more filler.
        q_len = len(encode(tokenizer, task.query.format(key=keys[i])))
        needle_last = starts[i] + len(needles[i]) - 1
        need = needle_last + min_distance - (len(ids) + len(gap) + q_len - 1)
        if need > 0:
            gap += filler.take(need, rng)
        if len(ids) + len(gap) + len(qa[i]) > length:
            break
        ids += gap + qa[i]
        n_answer = len(qa[i]) - q_len
        answers += range(len(ids) - n_answer, len(ids))
    ids += filler.take(length - len(ids), rng)
    mask = [False] * length
    for a in answers:
        mask[a] = True
    return ids[:length], mask


# ------------------------------------------------------------------ symbolic tasks (tiny models)


def symbolic_vocab(num_keys: int, num_values: int, num_filler: int) -> dict[str, list[str]]:
    """Word lists of a symbolic key-value task: keys ``k0..``, values ``v0..``, needles ``k0v0..``, filler ``f0..``."""
    keys, values = [f"k{i}" for i in range(num_keys)], [f"v{i}" for i in range(num_values)]
    return {"keys": keys, "values": values, "needles": [k + v for k in keys for v in values],
            "filler": [f"f{i}" for i in range(num_filler)]}


def symbolic_task(num_keys: int, num_values: int, distractors: int = 0) -> TaskSpec:
    """Key-value retrieval for tiny models: needle ``k3v5`` (one token), query ``? k3``, answer ``v5``.

    With :func:`build_word_tokenizer` over :func:`symbolic_vocab` every word is one token, so one
    attention head can answer: the query's key token attends to the needle token that holds it
    and copies its value. Keys and values are drawn per sample, so only retrieval helps; a
    sliding-window head cannot answer once the needle is ``window`` tokens back.
    """
    v = symbolic_vocab(num_keys, num_values, 0)
    return TaskSpec(name="symbolic_kv", needle=" {key}{value}", query=" ? {key}", answer=" {value}",
                    keys=v["keys"], values=v["values"], distractors=distractors)


def symbolic_filler(words: Sequence[str], n: int, seed: int) -> str:
    """``n`` filler words drawn uniformly (deterministic in ``seed``), as one text."""
    rng = random.Random(seed)
    return " ".join(rng.choice(list(words)) for _ in range(n))


def build_word_tokenizer(words: Sequence[str], out_dir=None):
    """A word-level tokenizer (whitespace split) over ``words`` plus ``?`` and ``<|endoftext|>`` (id 0).

    Saved as a ``PreTrainedTokenizerFast`` to ``out_dir`` when given; returns it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "?": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
