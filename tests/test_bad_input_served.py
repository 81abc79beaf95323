"""Bad input to a served ConSA model (issue 14): HTTP requests, /v1/consa/* with --api-key, and
a bad allocation under the plain vLLM server.

One real ``consa-vllm serve`` (tests/server_harness.py) with ``--api-key``, serving the
largest window an allocation may hold (2**31 - 1 tokens; 10**23 used to pass every check
and break the first completion). Run under the engine lock:
``flock /tmp/consa-engine.lock env PYTHONPATH=$PWD python -m pytest tests/test_bad_input_served.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from server_harness import consa_serve, http_get

pytestmark = pytest.mark.engine
openai = pytest.importorskip("openai")

KEY = "test-key-14"
MAX_MODEL_LEN = 256
PATTERN = ["SF", "SS"]  # 2 layers x 2 KV heads, S heads in both layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from consa_vllm.allocation import Allocation
    from consa_vllm.allocation.format import MAX_TOKENS
    from consa_vllm.export import export_model
    from consa_vllm.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("served-bad-input")
    src = build_tiny_model(root / "src", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32)
    alloc = Allocation(granularity="kv_head", window=MAX_TOKENS, pattern=PATTERN)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        dst = export_model(src, alloc, root / "consa")
    return {"src": src, "dir": dst}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("served-bad-input-log") / "server.log"
    with consa_serve(checkpoint["dir"], log_path, max_model_len=MAX_MODEL_LEN, extra_args=["--api-key", KEY]) as srv:
        yield srv


def request(base: str, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON or text) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.mark.parametrize("path", ["/v1/consa/allocation", "/v1/consa/metrics"])
def test_consa_routes_answer_401_without_the_key(server, path):
    for key in (None, "wrong-key"):
        assert request(server["base"], "GET", path, key=key) == (401, {"error": "Unauthorized"})
    status, body = request(server["base"], "GET", path)
    assert status == 200, body
    if path.endswith("allocation"):
        assert body["window"] == 2**31 - 1 and body["allocation"]["pattern"] == PATTERN
    else:
        # Idle server: both pools present, no block held.
        for pool in ("full", "sliding"):
            assert re.search(rf'^consa_kv_blocks_in_use{{model_name="[^"]+",pool="{pool}"}} 0\.0$', body, re.M), body


def test_largest_window_serves_like_dense(server, checkpoint):
    """A window past any position: S heads act as F, so greedy tokens are the dense model's."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = list(range(3, 3 + 120))
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, timeout=120, max_retries=0)
    r = client.completions.create(model=server["model"], prompt=ids, temperature=0, max_tokens=12, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    served = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
    model = AutoModelForCausalLM.from_pretrained(checkpoint["src"], dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert served == out[0, len(ids):].tolist()


# (method, path, body or raw bytes, expected status, phrase of the answer): vLLM's own checks,
# which a ConSA model must leave as they are; the server keeps serving after each.
MODEL = "{model}"
BAD_REQUESTS = [
    ("POST", "/v1/consa/allocation", {}, 405, "Method Not Allowed"),
    ("GET", "/v1/consa/nope", None, 404, "Not Found"),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "a", "max_tokens": 2}, 404,
     "The model `nope` does not exist."),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -1}, 400,
     "max_tokens must be at least 1, got -1."),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10**23}, 400,
     "cannot be greater than max_model_len"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [99999], "max_tokens": 2}, 400,
     "Token id 99999 is out of vocabulary"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "logprobs": 1000}, 400,
     "Requested sample logprobs of 1000, which is greater than max allowed: 20"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "temperature": -1}, 400,
     "temperature must be non-negative"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "n": 0}, 400,
     "n must be at least 1, got 0."),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 2}, 400,
     "You must pass at least one prompt"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a" * 5000, "max_tokens": 2}, 400,
     "This model's maximum context length is 256 tokens"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "hi", "max_tokens": 2}, 400,
     "Input should be a valid list"),
    ("POST", "/v1/completions", b"{not json", 400, "JSON decode error"),
]


@pytest.mark.parametrize("method, path, body, status, phrase", BAD_REQUESTS,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_clear_4xx_and_the_server_survives(server, method, path, body, status, phrase):
    if isinstance(body, dict):
        body = {k: (server["model"] if v == MODEL else v) for k, v in body.items()}
    got, answer = request(server["base"], method, path, body=None if isinstance(body, bytes) else body,
                          raw=body if isinstance(body, bytes) else None)
    assert got == status, answer
    assert phrase in json.dumps(answer) or phrase in str(answer), answer
    assert http_get(server["base"] + "/health")[0] == 200


# ----------------------------------------------------------------------------- the plain vLLM server


def test_plain_vllm_server_says_the_allocation_error_first(checkpoint, tmp_path):
    """Before vLLM's traceback (pydantic wraps the hook's error), one ERROR line says what is wrong."""
    d = tmp_path / "bad"
    shutil.copytree(checkpoint["dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["consa"]["window"] = 64.5
    (d / "config.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d),
                        "--port", "1", "--max-model-len", "256", "--dtype", "float32", "--enforce-eager"],
                       capture_output=True, text=True, timeout=240, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.monotonic() - t0 < 180
    assert "Loading weights" not in out and "EngineCore" not in out, out[-4000:]
    msg = (f"ConSA: the server cannot start: {d / 'config.json'} (field 'consa'): invalid allocation: field 'window': "
           "expected a JSON integer (a whole number without quotes), got 64.5")
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "Traceback" in line or "ConSA:" in line)
    assert msg in lines[first], "\n".join(lines[first - 2:first + 3])
