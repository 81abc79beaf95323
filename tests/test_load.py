"""``/v1/consa/allocation``, the F/S KV-block metrics, and the server under load (CPU, real vLLM).

One ``consa-vllm serve`` subprocess for the whole module, on a loopback port, with
``VLLM_PLUGINS`` unset so that the wrapper's default (every installed plugin plus the
``consa_endpoint`` endpoint plugin) is what is tested. The model is a tiny random Qwen3
with a mixed kv_head allocation (2, 0, 1, 3 F heads per layer) and a window of 24 tokens,
far shorter than the prompts.

- The endpoint's JSON equals the exported allocation and the project's estimator at the
  served ``max_model_len``; the ``consa_kv_*`` metrics are on vLLM's own ``/metrics``.
- One long streamed request: while it decodes, the F pool holds blocks for the whole
  context and the S pool only for the window.
- Load: dozens of concurrent requests (asyncio + the official ``AsyncOpenAI`` client)
  with prompts longer than the window, some over ``max_model_len`` (clear 400), some
  streams closed by the client after a few chunks. Afterwards the server answers with
  the same greedy tokens as before, and the F and S blocks in use return to the baseline.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from server_harness import consa_serve, http_get

openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

pytestmark = pytest.mark.engine

WINDOW = 24
PATTERN = ["FFSS", "SSSS", "FSSS", "FFFS"]  # 2, 0, 1, 3 F heads per layer
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
LOAD_TIMEOUT_S = 150  # the whole load phase; it takes ~20-40 s on 2 busy cores
SETTLE_TIMEOUT_S = 30  # for the block counts to come back to the baseline

N_OK, N_STREAM_OK, N_OVER, N_DISCONNECT = 20, 8, 6, 10
PROBE_LEN, PROBE_TOKENS = 200, 16


# ----------------------------------------------------------------------------- helpers



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def consa_metrics(text: str) -> dict:
    """The consa_kv_* samples of a Prometheus text page, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("consa_kv_"):
                key = s.name if "pool" not in s.labels else (s.name, s.labels["pool"])
                out[key] = s.value
    return out


def blocks_now(server) -> dict:
    """In-use and free blocks from vLLM's own /metrics."""
    status, text = http_get(server["base"] + "/metrics")
    assert status == 200, text[-2000:]
    m = consa_metrics(text)
    return {"full": m[("consa_kv_blocks_in_use", "full")], "sliding": m[("consa_kv_blocks_in_use", "sliding")],
            "free": m["consa_kv_blocks_free"], "total": m["consa_kv_blocks_total"]}


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    from consa_vllm.allocation import Allocation
    from consa_vllm.export import export_model

    dst = tmp_path_factory.mktemp("load") / "tiny-qwen3-consa"
    src = tiny_model("qwen3", num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32)
    alloc = Allocation(granularity="kv_head", window=WINDOW, pattern=PATTERN).with_extra(target_sparsity=0.5)
    export_model(src, alloc, dst, force=True)
    vocab = json.loads((dst / "config.json").read_text())["vocab_size"]
    return {"dir": dst, "vocab": vocab}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``consa-vllm serve`` on a free loopback port, VLLM_PLUGINS unset (the wrapper's default)."""
    log_path = tmp_path_factory.mktemp("load-log") / "server.log"
    with consa_serve(checkpoint["dir"], log_path, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                     drop_env=("VLLM_PLUGINS",)) as srv:
        yield srv


@pytest.fixture(scope="module")
def info(server):
    """The parsed /v1/consa/allocation response."""
    from consa_vllm.endpoint.schema import AllocationInfo

    status, body = http_get(server["base"] + "/v1/consa/allocation")
    assert status == 200, server["dump"](f"/v1/consa/allocation answered {status}: {body[:2000]}")
    return AllocationInfo.model_validate_json(body)


def _async_client(server):
    return openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)


async def _greedy(client, server, prompt: list[int], n: int = PROBE_TOKENS) -> list[int]:
    r = await client.completions.create(model=server["model"], prompt=prompt, max_tokens=n, temperature=0,
                                        logprobs=0, extra_body={"return_tokens_as_token_ids": True,
                                                                "ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    return [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]


@pytest.fixture(scope="module")
def probe(server, checkpoint):
    """A greedy request answered before any load: (prompt, tokens)."""
    prompt = random_prompt(random.Random(123), PROBE_LEN, checkpoint["vocab"])

    async def run():
        async with _async_client(server) as client:
            return await _greedy(client, server, prompt)

    return prompt, asyncio.run(run())


# ----------------------------------------------------------------------------- tests


def test_allocation_endpoint_matches_export_and_estimator(info, server, checkpoint):
    from consa_vllm.allocation import ModelShape, estimate_kv
    from consa_vllm.export import read_exported_allocation

    alloc = read_exported_allocation(checkpoint["dir"])
    assert info.model == server["model"]
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.allocation == alloc.to_dict()
    assert (info.granularity, info.window) == ("kv_head", WINDOW)
    assert info.allocation["pattern"] == PATTERN
    assert info.sparsity == alloc.sparsity == 1 - 6 / 16
    assert info.target_sparsity == 0.5
    assert (info.num_layers, info.num_kv_heads) == (4, 4)
    assert info.full_heads_per_layer == [2, 0, 1, 3]
    assert (info.full_kv_heads, info.sliding_kv_heads) == (6, 10)

    # The estimate at max_model_len, in the blocks the engine really uses.
    est = info.kv_estimate
    pools = {p.pool: p for p in info.kv_blocks.pools}
    assert set(pools) == {"full", "sliding"}
    assert (est.block_size_full, est.block_size_sliding) == (pools["full"].block_size, pools["sliding"].block_size)
    assert est.block_size_full % 32 == 0 and est.block_size_sliding % 32 == 0  # CPU_ATTN blocks
    assert est.context == MAX_MODEL_LEN and est.dtype == "float32"
    ref = estimate_kv(alloc, ModelShape.from_model_dir(checkpoint["dir"]), MAX_MODEL_LEN, dtype="float32",
                      block_size=(est.block_size_full, est.block_size_sliding))
    assert est.bytes_per_sequence == ref.bytes_per_sequence
    assert est.dense_bytes_per_sequence == ref.dense_bytes_per_sequence
    assert est.ratio_to_dense == pytest.approx(ref.ratio_to_dense) and est.ratio_to_dense < 1
    assert est.capacity_gain == pytest.approx(ref.capacity_gain)
    # 6 F heads keep 512 tokens in whole F blocks, 10 S heads the blocks over the last 24 tokens
    # (32 head_dim, float32 K and V).
    per_token_head = 2 * 32 * 4
    slide_tokens = ((MAX_MODEL_LEN - 1) // est.block_size_sliding - (MAX_MODEL_LEN - WINDOW)
                    // est.block_size_sliding + 1) * est.block_size_sliding
    assert est.bytes_per_sequence == per_token_head * (6 * _cdiv(MAX_MODEL_LEN, est.block_size_full)
                                                       * est.block_size_full + 10 * slide_tokens)
    # An idle server: nothing in use, the whole pool free.
    assert (pools["full"].blocks_in_use, pools["sliding"].blocks_in_use) == (0, 0)
    assert info.kv_blocks.free_blocks == info.kv_blocks.num_blocks > 0
    assert pools["full"].num_layers == 1 and pools["sliding"].num_layers == 1  # one pool module each


def test_metrics_on_vllm_metrics_and_consa_path(info, server):
    status, text = http_get(server["base"] + "/metrics")
    assert status == 200
    assert "vllm:" in text  # vLLM's own metrics are on the same page
    on_vllm = consa_metrics(text)
    status, own = http_get(server["base"] + "/v1/consa/metrics")
    assert status == 200
    assert consa_metrics(own) == on_vllm
    assert "vllm:" not in own
    sizes = {p.pool: p.block_size for p in info.kv_blocks.pools}
    assert on_vllm == {
        ("consa_kv_blocks_in_use", "full"): 0.0, ("consa_kv_blocks_in_use", "sliding"): 0.0,
        ("consa_kv_block_size_tokens", "full"): sizes["full"],
        ("consa_kv_block_size_tokens", "sliding"): sizes["sliding"],
        ("consa_kv_bytes_in_use", "full"): 0.0, ("consa_kv_bytes_in_use", "sliding"): 0.0,
        "consa_kv_blocks_total": info.kv_blocks.num_blocks, "consa_kv_blocks_free": info.kv_blocks.num_blocks,
    }
    assert f'model_name="{server["model"]}"' in text


def test_long_stream_holds_full_context_in_f_and_window_in_s(info, server, checkpoint, probe):
    """While one long request decodes, F holds the whole context, S only the window."""
    bf, bs = info.kv_estimate.block_size_full, info.kv_estimate.block_size_sliding
    prompt = random_prompt(random.Random(5), 400, checkpoint["vocab"])
    max_tokens = MAX_MODEL_LEN - len(prompt)

    async def run():
        async with _async_client(server) as client:
            stream = await client.completions.create(model=server["model"], prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            chunks = 0
            async for _ in stream:
                chunks += 1
                if chunks == 3:
                    seen = await asyncio.to_thread(blocks_now, server)
                    break
            await stream.close()  # the client goes away mid-stream
            return chunks, seen

    chunks, seen = asyncio.run(run())
    assert chunks == 3
    assert _cdiv(len(prompt), bf) <= seen["full"] <= _cdiv(MAX_MODEL_LEN, bf), seen
    # The window (24 tokens) spans at most 2 S blocks; one more may wait to be freed.
    assert 1 <= seen["sliding"] <= _cdiv(WINDOW, bs) + 2, seen
    assert seen["free"] == seen["total"] - seen["full"] - seen["sliding"]
    # The closed stream is aborted: its blocks come back.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (now := blocks_now(server))["full"] or now["sliding"] or now["free"] != now["total"]:
        assert time.monotonic() < deadline, f"blocks of the closed stream not released: {now}"
        time.sleep(0.5)


async def _load(server, vocab: int) -> dict:
    """The load phase; returns what each kind of request saw and the peak blocks in use."""
    rng = random.Random(0)
    peak = {"full": 0, "sliding": 0}
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            b = await asyncio.to_thread(blocks_now, server)
            peak["full"], peak["sliding"] = max(peak["full"], b["full"]), max(peak["sliding"], b["sliding"])
            await asyncio.sleep(0.1)

    async def ok(client, n, k):
        prompt = random_prompt(rng, n, vocab)
        r = await client.completions.create(model=server["model"], prompt=prompt, max_tokens=k, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.usage.prompt_tokens == n and r.usage.completion_tokens == k

    async def stream_ok(client, n, k):
        prompt = random_prompt(rng, n, vocab)
        stream = await client.completions.create(model=server["model"], prompt=prompt, max_tokens=k,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        usage = None
        async for ev in stream:
            usage = ev.usage or usage
        return usage is not None and usage.completion_tokens == k

    async def over(client, n):
        prompt = random_prompt(rng, n, vocab)
        try:
            await client.completions.create(model=server["model"], prompt=prompt, max_tokens=8, temperature=0)
        except openai.BadRequestError as e:
            return e.status_code, str(e), n
        return None, "accepted", n

    async def disconnect(client, n):
        prompt = random_prompt(rng, n, vocab)
        stream = await client.completions.create(model=server["model"], prompt=prompt,
                                                 max_tokens=MAX_MODEL_LEN - n, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 3:
                break
        await stream.close()
        return chunks

    async with _async_client(server) as client:
        jobs = ([ok(client, rng.randrange(WINDOW + 16, 400), rng.randrange(4, 24)) for _ in range(N_OK)]
                + [stream_ok(client, rng.randrange(WINDOW + 16, 400), rng.randrange(4, 24))
                   for _ in range(N_STREAM_OK)]
                + [over(client, MAX_MODEL_LEN + rng.randrange(1, 200)) for _ in range(N_OVER)]
                + [disconnect(client, rng.randrange(WINDOW + 16, 300)) for _ in range(N_DISCONNECT)])
        rng.shuffle(jobs)
        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        try:
            results = await asyncio.wait_for(asyncio.gather(*jobs), LOAD_TIMEOUT_S)
        finally:
            done.set()
            await sampler
    return {"results": results, "peak": peak, "seconds": time.monotonic() - t0}


def test_load_then_same_answers_and_no_leaked_blocks(server, checkpoint, probe):
    baseline = blocks_now(server)
    assert (baseline["full"], baseline["sliding"]) == (0, 0)
    assert baseline["free"] == baseline["total"]

    out = asyncio.run(_load(server, checkpoint["vocab"]))
    print(f"\nload: {N_OK + N_STREAM_OK + N_OVER + N_DISCONNECT} requests in {out['seconds']:.1f} s, "
          f"peak blocks in use {out['peak']}")
    results = out["results"]
    oks = [r for r in results if r is True or r is False]
    overs = [r for r in results if isinstance(r, tuple)]
    disconnects = [r for r in results if isinstance(r, int) and not isinstance(r, bool)]
    assert oks == [True] * (N_OK + N_STREAM_OK)
    assert len(overs) == N_OVER and len(disconnects) == N_DISCONNECT
    for status, msg, n in overs:
        assert status == 400, msg
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in msg, msg
        assert f"contains {n} input tokens" in msg, msg
    assert disconnects == [3] * N_DISCONNECT
    # The metrics saw the load in both pools.
    assert out["peak"]["full"] > 0 and out["peak"]["sliding"] > 0, out["peak"]

    # Every block comes back: aborted streams included.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (now := blocks_now(server)) != baseline:
        assert time.monotonic() < deadline, f"blocks in use did not return to {baseline}: {now}"
        time.sleep(0.5)

    # The server still answers, and answers the same.
    assert server["proc"].poll() is None, server["dump"]("server died under load")
    assert http_get(server["base"] + "/health")[0] == 200
    prompt, before = probe

    async def again():
        async with _async_client(server) as client:
            return await _greedy(client, server, prompt)

    assert asyncio.run(again()) == before
    assert blocks_now(server) == baseline
