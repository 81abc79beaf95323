"""The OpenAI-compatible HTTP API on a ConSA model (CPU, real vLLM engine).

One server for the whole module, started the way a user would start it:
``consa-vllm serve DIR --port P ...`` as a subprocess, which checks the checkpoint and
execs ``python -m vllm.entrypoints.openai.api_server``. The model is a tiny random Qwen3
exported with a mixed kv_head allocation (uneven F counts per layer, one layer with no F
head) and a window shorter than every prompt. It is queried with the official ``openai``
client; greedy outputs are compared token by token with the Hugging Face reference
(``consa_vllm.reference.patch_model``) on the same weights.
"""

from __future__ import annotations

import pytest

from server_harness import consa_serve, http_get

openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

pytestmark = pytest.mark.engine

WINDOW = 24
PATTERN = ["FFSS", "SSSS", "FSSS", "FFFS"]  # 2, 0, 1, 3 F heads per layer
MAX_MODEL_LEN = 512
MAX_TOKENS = 16
LOGPROB_ATOL = 1e-3  # float32 CPU: real agreement is ~1e-5 (docs/DESIGN.md §10); 1e-3 means a bug

PROMPT = ("import os\nimport sys\n\ndef main(argv):\n    for name in sorted(os.listdir('.')):\n"
          "        print(name, file=sys.stderr)\n    return 0\n")
LONG_PROMPT = ("class Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n"
               + "".join(f"    option_{i} = os.environ.get('OPTION_{i}', '{i}')\n" for i in range(12))
               + "\n    def items(self):\n        return")
MESSAGES = [{"role": "user", "content": "Write a function that returns the sum of a list."}]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    dst = tmp_path_factory.mktemp("http") / "tiny-qwen3-consa"
    src = tiny_model("qwen3", num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN)
    export_model(src, alloc, dst, force=True)
    return {"src": src, "dir": dst, "allocation": alloc}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``consa-vllm serve`` on a free loopback port (see server_harness.consa_serve)."""
    log_path = tmp_path_factory.mktemp("http-log") / "server.log"
    with consa_serve(checkpoint["dir"], log_path, max_model_len=MAX_MODEL_LEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """HF model with the reference ConSA attention, and the tokenizer of the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from consa_vllm.reference import patch_model

    tok = AutoTokenizer.from_pretrained(checkpoint["dir"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint["src"], dtype=torch.float32).eval()
    state = patch_model(model, window=WINDOW, allocation=checkpoint["allocation"])

    class Ref:
        tokenizer = tok

        @staticmethod
        def greedy(ids: list[int], n: int = MAX_TOKENS) -> list[int]:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            return out[0, len(ids):].tolist()

        @staticmethod
        def logprobs(ids: list[int], gen: list[int], dense: bool = False) -> list[float]:
            """Log-probabilities of ``gen`` after ``ids`` (ConSA attention, or all-full if dense)."""
            if dense:
                state.disable()
            try:
                with torch.no_grad():
                    logits = model(torch.tensor([ids + gen])).logits[0].float()
            finally:
                state.enable()
            lp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
            return lp[torch.arange(len(gen)), torch.tensor(gen)].tolist()

        @staticmethod
        def chat_ids(messages) -> list[int]:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]

    return Ref


def _token_ids(logprob_tokens) -> list[int]:
    """Token ids from logprob entries rendered as 'token_id:N' (return_tokens_as_token_ids)."""
    return [int(t.split(":", 1)[1]) for t in logprob_tokens]


GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
AS_IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}


def _complete(client, server, prompt, **kw):
    return client.completions.create(model=server["model"], prompt=prompt, logprobs=0,
                                     extra_body=AS_IDS, **GREEDY, **kw)


# ----------------------------------------------------------------------------- tests


def test_prompts_are_longer_than_the_window(reference):
    for p in (PROMPT, LONG_PROMPT):
        assert len(reference.tokenizer(p)["input_ids"]) > WINDOW
    assert len(reference.chat_ids(MESSAGES)) > WINDOW


def test_models_lists_the_model(client, server):
    ids = [m.id for m in client.models.list().data]
    assert server["model"] in ids


def test_completion_greedy_matches_reference(client, server, reference):
    r = _complete(client, server, PROMPT)
    choice = r.choices[0]
    assert choice.text, "empty completion"
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.total_tokens == len(prompt_ids) + MAX_TOKENS
    assert choice.finish_reason == "length"
    got = _token_ids(choice.logprobs.tokens)
    ref = reference.greedy(prompt_ids)
    assert got == ref
    assert choice.text == reference.tokenizer.decode(got)
    ref_lp = reference.logprobs(prompt_ids, ref)
    diff = max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, ref_lp))
    assert diff < LOGPROB_ATOL, diff


def test_prompt_longer_than_window_uses_the_window(client, server, reference):
    """A prompt many windows long: exact greedy parity with ConSA, measurably not dense."""
    prompt_ids = reference.tokenizer(LONG_PROMPT)["input_ids"]
    assert len(prompt_ids) > 4 * WINDOW
    r = _complete(client, server, LONG_PROMPT)
    got = _token_ids(r.choices[0].logprobs.tokens)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert got == reference.greedy(prompt_ids)
    served = r.choices[0].logprobs.token_logprobs
    consa = reference.logprobs(prompt_ids, got)
    dense = reference.logprobs(prompt_ids, got, dense=True)
    assert max(abs(a - b) for a, b in zip(served, consa)) < LOGPROB_ATOL
    # The S heads really slide: all-full attention gives different numbers on this prompt.
    assert max(abs(a - b) for a, b in zip(served, dense)) > 10 * LOGPROB_ATOL


def test_prompt_as_token_ids(client, server, reference):
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    r = _complete(client, server, prompt_ids)
    assert _token_ids(r.choices[0].logprobs.tokens) == reference.greedy(prompt_ids)
    assert r.usage.prompt_tokens == len(prompt_ids)


def test_chat_completion_matches_reference(client, server, reference):
    r = client.chat.completions.create(model=server["model"], messages=MESSAGES, logprobs=True,
                                       extra_body=AS_IDS, **GREEDY)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content, "empty chat completion"
    ids = reference.chat_ids(MESSAGES)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == MAX_TOKENS
    got = _token_ids(t.token for t in choice.logprobs.content)
    assert got == reference.greedy(ids)


def test_streaming_completion_equals_non_streamed(client, server):
    full = client.completions.create(model=server["model"], prompt=PROMPT, extra_body=AS_IDS, **GREEDY)
    stream = client.completions.create(model=server["model"], prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, extra_body=AS_IDS, **GREEDY)
    chunks, usage, finish = [], None, None
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            chunks.append(c.text)
            finish = c.finish_reason or finish
    assert len(chunks) > 1, "not streamed"
    assert "".join(chunks) == full.choices[0].text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_streaming_chat_equals_non_streamed(client, server):
    full = client.chat.completions.create(model=server["model"], messages=MESSAGES, extra_body=AS_IDS, **GREEDY)
    stream = client.chat.completions.create(model=server["model"], messages=MESSAGES, stream=True,
                                            extra_body=AS_IDS, **GREEDY)
    parts, finish, n = [], None, 0
    for ev in stream:
        for c in ev.choices:
            n += 1
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    assert n > 1, "not streamed"
    assert "".join(parts) == full.choices[0].message.content
    assert finish == "length"


def test_request_over_max_model_len_is_400_and_server_survives(client, server, reference):
    long_ids = (reference.tokenizer(LONG_PROMPT)["input_ids"] * 8)[:MAX_MODEL_LEN + 10]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server["model"], prompt=long_ids, max_tokens=4, temperature=0)
    assert e.value.status_code == 400
    assert "maximum context length" in str(e.value) or str(MAX_MODEL_LEN) in str(e.value)
    # Prompt fits, but prompt + max_tokens does not.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=MAX_MODEL_LEN, temperature=0)
    # Still serving.
    assert server["proc"].poll() is None, server["dump"]("server died after a bad request")
    assert http_get(server["base"] + "/health")[0] == 200
    r = _complete(client, server, PROMPT)
    assert r.choices[0].text
    assert _token_ids(r.choices[0].logprobs.tokens) == reference.greedy(reference.tokenizer(PROMPT)["input_ids"])
