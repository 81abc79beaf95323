"""consa_vllm.eval: task generators, metrics through the reference attention, the CLI.

Fast (no vLLM engine): a tiny random Qwen3 and its BPE tokenizer, plus a word-level tokenizer.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from consa_vllm.allocation import Allocation, ModelShape, estimate_kv, make_allocation
from consa_vllm.eval import cli, metrics
from consa_vllm.eval.tasks import (KV, PASSKEY, Filler, build_word_tokenizer, make_sample, make_samples,
                                   symbolic_filler, symbolic_task, symbolic_vocab, training_document)

WINDOW = 16


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model(num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32, hidden_size=64,
                      intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="module")
def bpe(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


@pytest.fixture(scope="module")
def words():
    v = symbolic_vocab(16, 16, 8)
    return v, build_word_tokenizer(v["keys"] + v["values"] + v["needles"] + v["filler"])


def _find(hay: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(hay) - len(needle) + 1) if hay[i:i + len(needle)] == needle]


def _needle_ids(tok, task, ids: list[int], answer: str) -> list[int]:
    """The ids of the needle that holds ``answer`` for the query ending ``ids`` (its key read back from the text)."""
    key = None
    if "{key}" in task.query:
        words = tok.decode(ids[-12:]).split()
        key = words[words.index("==") - 1]
    return tok(task.needle.format(key=key, value=answer.strip()), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", [PASSKEY, KV], ids=["passkey", "kv"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_sample_has_exact_length_and_needle_at_the_stated_distance(bpe, task, depth):
    filler = Filler(bpe, None, min_tokens=400)
    s = make_sample(task, bpe, filler, 200, depth, random.Random(5), window=WINDOW)
    assert len(s.prompt_ids) == s.context == 200
    value = s.answer.strip()
    needle = bpe(task.needle.format(key="KEY", value=value), add_special_tokens=False)["input_ids"]
    # The needle's own ids (with the real key) appear at 199 - distance.
    start = 199 - s.distance
    assert bpe.decode(s.prompt_ids[start:start + len(needle) + 4]).find(value) >= 0
    query_end = bpe(task.query.format(key="k_xxxx"), add_special_tokens=False)["input_ids"][-1]
    assert s.prompt_ids[-1] == query_end  # the prompt ends with the query
    assert s.answer_ids == bpe(s.answer, add_special_tokens=False)["input_ids"]
    # Changed from `s.distance >= WINDOW` (the needle's first token) to the stricter, correct rule:
    # beyond the window only when the needle's last token is, with the needle's exact ids at start.
    real = _needle_ids(bpe, task, s.prompt_ids, s.answer)
    assert s.prompt_ids[start:start + len(real)] == real and s.needle_tokens == len(real)
    assert s.beyond_window == (199 - (start + len(real) - 1) >= WINDOW)


def test_depth_orders_the_distance_and_samples_are_deterministic(bpe):
    filler = Filler(bpe, None, min_tokens=400)
    ss = [make_sample(PASSKEY, bpe, filler, 300, d, random.Random(0)) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    dist = [s.distance for s in ss]
    tail = [len(bpe(t, add_special_tokens=False)["input_ids"])
            for t in (PASSKEY.needle.format(value=ss[-1].answer.strip()), PASSKEY.query)]
    assert dist == sorted(dist, reverse=True) and dist[0] == 299 and dist[-1] == sum(tail) - 1
    a = make_samples([PASSKEY, KV], bpe, filler, [100, 150], [0.0, 0.5], 3, seed=7)
    b = make_samples([PASSKEY, KV], bpe, filler, [100, 150], [0.0, 0.5], 3, seed=7)
    c = make_samples([PASSKEY, KV], bpe, filler, [100, 150], [0.0, 0.5], 3, seed=8)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c]
    assert len(a) == 2 * 2 * 2 * 3 and len({s.answer for s in a}) > 6


def test_kv_distractors_have_other_keys_and_the_queried_key_once(words):
    v, tok = words
    task = symbolic_task(16, 16, distractors=3)
    filler = Filler(tok, [symbolic_filler(v["filler"], 500, 0)])
    for seed in range(20):
        s = make_sample(task, tok, filler, 48, 0.2, random.Random(seed), window=8)
        text = tok.decode(s.prompt_ids).split()
        needles = [w for w in text if w.startswith("k") and "v" in w]
        assert len(needles) == 4 and len({w.split("v")[0] for w in needles}) == 4  # 4 distinct keys
        qkey = text[-1]
        first = text.index(qkey + s.answer.strip())  # the queried key's needle holds the answer
        assert len(s.prompt_ids) - 1 - s.distance == first  # word tokenizer: one word, one token


def test_too_short_context_is_refused(bpe):
    with pytest.raises(ValueError, match="too short"):
        make_sample(KV, bpe, Filler(bpe, None), 10, 0.5, random.Random(0))


def test_training_document_queries_are_beyond_min_distance(words):
    v, tok = words
    task = symbolic_task(16, 16)
    filler = Filler(tok, [symbolic_filler(v["filler"], 500, 0)])
    for seed in range(10):
        ids, mask = training_document(task, tok, filler, 96, random.Random(seed), num_needles=6, min_distance=24)
        assert len(ids) == len(mask) == 96
        text = tok.convert_ids_to_tokens(ids)
        queries = [i for i, w in enumerate(text) if w == "?"]
        assert queries, "no query fitted"
        assert [i for i, m in enumerate(mask) if m] == [q + 2 for q in queries]
        for q in queries:
            key, value = text[q + 1], text[q + 2]
            needle = text.index(key + value)  # the one-token needle holding both
            assert needle < q and text.count(key + value) == 1
            assert (q + 1) - needle >= 24  # the query's last token is min_distance from the needle


@pytest.mark.parametrize("sink", [0, 5])
def test_duo_documents_keep_every_needle_token_out_of_the_query_window_and_the_sink(bpe, sink):
    """--method duo's documents (multi-token BPE needles): a sliding-window head at a query (keys
    q-W+1..q, and 0..sink-1) sees no token of the needle that holds its answer, so only full
    attention can answer; the needle may end exactly W before the query (the bound is tight)."""
    from consa_vllm.train.duo import duo_batch

    filler = Filler(bpe, None, min_tokens=400)
    window = 64  # a quarter of the document: most queries must be pushed out to their needles' window
    gaps, answers = [], 0
    for index in range(12):
        ids, mask = duo_batch([PASSKEY, KV], bpe, filler, 256, window, sink, 4, 0, index)
        for r, task in enumerate([PASSKEY, KV] * 2):  # row r uses task (index * 4 + r) % 2
            row, m = ids[r].tolist(), mask[r].tolist()
            starts = [t for t in range(len(m)) if m[t] and not m[t - 1]]
            for a in starts:
                end = next((t for t in range(a, len(m)) if not m[t]), len(m))
                needle = _needle_ids(bpe, task, row[:a], bpe.decode(row[a:end]))
                (at,) = _find(row, needle)  # exactly once, before its query
                q, last = a - 1, at + len(needle) - 1
                assert at >= sink and last < q - window + 1, (index, r, at, last, q)
                gaps.append(q - last)
                answers += 1
    assert answers >= 50 and min(gaps) == window, (answers, sorted(gaps)[:5])


def test_beyond_window_counts_from_the_needles_last_token():
    from consa_vllm.eval.tasks import Sample

    def sample(needle_at, needle_tokens, sink=0):
        return Sample(task="t", prompt_ids=[0] * 100, answer_ids=[1], answer="a", context=100, depth=0.0,
                      distance=99 - needle_at, window=16, sink=sink, needle_tokens=needle_tokens)

    # The query (position 99) sees keys 84..99: a needle at 80..83 is out of reach, at 80..84 within it.
    assert sample(80, 4).beyond_window and not sample(80, 5).beyond_window
    assert sample(3, 10, sink=3).beyond_window and not sample(2, 10, sink=3).beyond_window


# ----------------------------------------------------------------------------- metrics


def _model(tiny, alloc=None):
    return cli.load_reference(tiny, alloc, WINDOW, device="cpu")


def test_lm_loss_overall_equals_hf_loss_and_buckets_cover_every_token(tiny):
    model = _model(tiny)
    torch.manual_seed(0)
    x = torch.randint(3, 500, (3, 100))
    r = metrics.lm_loss(model, x, WINDOW, batch_size=2)
    with torch.no_grad():
        hf = model(input_ids=x, labels=x).loss.item()
    assert r["loss"] == pytest.approx(hf, rel=1e-5)
    assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"] == 3 * 99
    assert [b["positions"] for b in r["buckets"]] == [[1, 17], [17, 33], [33, 49], [49, 81], [81, 100]]
    weighted = sum(b["loss"] * b["tokens"] for b in r["buckets"]) / r["tokens"]
    assert weighted == pytest.approx(r["loss"], rel=1e-9)
    # per sequence beyond the window: 3 means whose mean is the pooled figure (equal token counts)
    per = r["loss_beyond_window_per_sequence"]
    assert len(per) == 3 and sum(per) / 3 == pytest.approx(r["loss_beyond_window"], rel=1e-9)
    with torch.no_grad():
        one = model(input_ids=x[1:2], labels=x[1:2]).logits[0, WINDOW:-1].float()
    want = torch.nn.functional.cross_entropy(one, x[1, WINDOW + 1:]).item()
    assert per[1] == pytest.approx(want, rel=1e-5)


def test_served_loss_report_is_the_reference_report_from_the_same_logprobs(tiny):
    """ServedModel.lm_loss buckets the server's prompt logprobs with the reference's report
    (metrics.loss_report): fed the reference's own logprobs, it gives the same report."""
    from consa_vllm.eval.vllm_client import ServedModel

    model = _model(tiny)
    torch.manual_seed(2)
    x = torch.randint(3, 500, (3, 70))
    ref = metrics.lm_loss(model, x, WINDOW)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    by_prompt = {tuple(row): lp[i].tolist() for i, row in enumerate(x.tolist())}
    served = object.__new__(ServedModel)  # no server: its logprobs are the reference's
    served.token_logprobs = lambda ids: by_prompt[tuple(ids)]
    got = served.lm_loss(x, WINDOW)
    assert got.keys() == ref.keys()
    for k in ("tokens", "window", "seq_len", "sequences"):
        assert got[k] == ref[k], k
    assert [(b["positions"], b["beyond_window"], b["tokens"]) for b in got["buckets"]] == \
        [(b["positions"], b["beyond_window"], b["tokens"]) for b in ref["buckets"]]
    for a, b in zip(got["buckets"], ref["buckets"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["loss_beyond_window"] == pytest.approx(ref["loss_beyond_window"], rel=1e-5)
    assert got["loss_beyond_window_per_sequence"] == pytest.approx(ref["loss_beyond_window_per_sequence"], rel=1e-5)


def test_sliding_heads_change_only_the_buckets_beyond_the_window(tiny):
    torch.manual_seed(1)
    x = torch.randint(3, 500, (2, 90))
    dense = metrics.lm_loss(_model(tiny), x, WINDOW)
    all_s = Allocation(granularity="kv_head", window=WINDOW, pattern=["SS", "SS"])
    swa = metrics.lm_loss(_model(tiny, all_s), x, WINDOW)
    assert swa["buckets"][0]["loss"] == pytest.approx(dense["buckets"][0]["loss"], abs=1e-5)
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(swa["buckets"][1:], dense["buckets"][1:]))


def test_teacher_forced_retrieval_equals_greedy_generation(tiny, bpe):
    """score_retrieval's verdict is exactly "greedy decoding starts with the answer"."""
    model = _model(tiny)
    filler = Filler(bpe, None, min_tokens=200)
    samples = make_samples([PASSKEY, KV], bpe, filler, [80, 100], [0.0, 0.5], 2, seed=3, window=WINDOW)
    # Make half of them answerable by construction: the answer is what the model says greedily.
    with torch.no_grad():
        for s in samples[::2]:
            out = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=2, do_sample=False,
                                 pad_token_id=0)[0, len(s.prompt_ids):].tolist()
            s.answer_ids = out
    got = metrics.score_retrieval(model, samples, batch_size=3)
    want = []
    with torch.no_grad():
        for s in samples:
            out = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=len(s.answer_ids), do_sample=False,
                                 pad_token_id=0)[0, len(s.prompt_ids):].tolist()
            want.append(out == s.answer_ids)
    assert got == want and any(got)
    summary = metrics.summarize_retrieval(samples, got)
    assert summary["samples"] == len(samples) and len(summary["cells"]) == 2 * 2 * 2
    assert summary["accuracy"] == pytest.approx(sum(got) / len(got))


def _model_sample_and_greedy_answer(tiny, bpe, seed: int):
    """The dense model, one passkey sample of 90 tokens, and the model's 3 greedy tokens after it."""
    model = _model(tiny)
    base = make_samples([PASSKEY], bpe, Filler(bpe, None, min_tokens=200), [90], [0.5], 1, seed=seed,
                        window=WINDOW)[0]
    with torch.no_grad():
        g = model.generate(torch.tensor([base.prompt_ids]), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)[0, len(base.prompt_ids):].tolist()
    return model, base, g


def test_retrieval_rows_of_one_batch_with_different_answer_lengths(tiny, bpe):
    """Samples of one total length whose prompts and answers differ in length (two prompt
    lengths, so two forward passes): each row's verdict reads its own answer's positions."""
    import dataclasses

    model, base, g = _model_sample_and_greedy_answer(tiny, bpe, seed=4)
    wrong = (g[2] + 1) % 500
    samples = [dataclasses.replace(base, answer_ids=g),  # right, 3 answer tokens
               dataclasses.replace(base, prompt_ids=base.prompt_ids + g[:1], answer_ids=g[1:]),  # right, 2
               dataclasses.replace(base, answer_ids=g[:2] + [wrong]),  # wrong in its last token
               dataclasses.replace(base, prompt_ids=base.prompt_ids + g[:1], answer_ids=[g[1], wrong])]  # wrong, 2
    assert len({len(x.prompt_ids) + len(x.answer_ids) for x in samples}) == 1
    assert metrics.score_retrieval(model, samples, batch_size=4) == [True, True, False, False]


def test_retrieval_answers_of_different_lengths_share_one_padded_forward(tiny, bpe):
    """Samples of one prompt length go through one forward pass, their shorter answers padded on
    the right; each row's verdict reads its own answer's positions (a wrong offset or padding
    that leaks into earlier positions fails it)."""
    import dataclasses

    model, base, g = _model_sample_and_greedy_answer(tiny, bpe, seed=5)
    samples = [dataclasses.replace(base, answer_ids=g),  # right, 3 tokens
               dataclasses.replace(base, answer_ids=g[:1]),  # right, 1 token
               dataclasses.replace(base, answer_ids=[(g[0] + 1) % 500]),  # wrong, 1 token
               dataclasses.replace(base, answer_ids=g[:1] + [(g[1] + 1) % 500]),  # wrong in its 2nd token
               dataclasses.replace(base, answer_ids=g[:2])]  # right, 2 tokens
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape),
                                           with_kwargs=True)
    try:
        got = metrics.score_retrieval(model, samples, batch_size=8)
    finally:
        hook.remove()
    assert got == [True, True, False, False, True]
    assert calls == [torch.Size([5, len(base.prompt_ids) + 2])]


# ----------------------------------------------------------------------------- CLI


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(capsys, argv):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_help_is_clear(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--allocation", "--data", "--served-url", "--contexts", "--depths", "--out"):
        assert flag in out


@pytest.mark.parametrize("case", ["no-model", "bad-alloc-shape", "window-mismatch", "dense-no-window",
                                  "context-too-long", "missing-data", "served-model-alone", "bad-json",
                                  "server-down"])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, tiny, capsys, case):
    good = make_allocation("bottom", 0.5, 2, 2, WINDOW)
    good.save(tmp_path / "a.json")
    make_allocation("bottom", 0.5, 3, 2, WINDOW).save(tmp_path / "wrong.json")
    (tmp_path / "bad.json").write_text("{not json")
    argv, flag = {
        "no-model": (["--model", str(tmp_path / "nope"), "--window", "8"], "--model"),
        "bad-alloc-shape": (["--model", str(tiny), "--allocation", str(tmp_path / "wrong.json")], "--allocation"),
        "window-mismatch": (["--model", str(tiny), "--allocation", str(tmp_path / "a.json"), "--window", "9"],
                            "--window"),
        "dense-no-window": (["--model", str(tiny)], "--window"),
        "context-too-long": (["--model", str(tiny), "--window", "8", "--contexts", "9999"], "--contexts"),
        "missing-data": (["--model", str(tiny), "--window", "8", "--data", str(tmp_path / "none.txt")], "--data"),
        "served-model-alone": (["--model", str(tiny), "--window", "8", "--served-model", "x"], "--served-model"),
        "bad-json": (["--model", str(tiny), "--allocation", str(tmp_path / "bad.json")], "--allocation"),
        "server-down": (["--model", str(tiny), "--window", "8", "--contexts", "96", "--samples", "1",
                         "--served-url", f"http://127.0.0.1:{_closed_port()}"], "--served-url"),
    }[case]
    rc, out, err = _run(capsys, argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("consa-vllm eval: error:") and flag in lines[0], err


def test_cli_report_on_a_tiny_model(tmp_path, tiny, capsys):
    alloc = make_allocation("random", 0.5, 2, 2, WINDOW, seed=1)
    alloc.save(tmp_path / "a.json")
    data = tmp_path / "heldout.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "r" / "report.json"
    rc, _, err = _run(capsys, ["--model", str(tiny), "--allocation", str(tmp_path / "a.json"), "--data", str(data),
                               "--contexts", "96", "128", "--depths", "0", "0.5", "--samples", "2",
                               "--loss-sequences", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0, err
    report = cli.EvalReport.model_validate_json(out.read_text())
    assert report.backend == "reference" and report.window == WINDOW and report.sparsity == 0.5
    assert report.retrieval["samples"] == 2 * 2 * 2 * 2
    assert report.loss["seq_len"] == 128 and report.loss["sequences"] == 2
    shape = ModelShape.from_model_dir(tiny)
    assert [k["ratio_to_dense"] for k in report.kv] == \
        [estimate_kv(alloc, shape, c).ratio_to_dense for c in (96, 128)]
    assert json.loads(out.read_text())["allocation"]["pattern"] == alloc.pattern
