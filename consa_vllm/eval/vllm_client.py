"""The same metrics for a model served by vLLM, through the OpenAI completions API.

Prompts go as token ids (the API accepts a list of ints), so the served model sees exactly
the ids the reference sees. Retrieval: greedy completion (temperature 0) of the answer's
length; correct when the generated ids start with the answer ids. Loss: the prompt's own
logprobs, asked with ``echo=True, max_tokens=0, logprobs=1`` (vLLM returns prompt logprobs
for that), bucketed like :func:`consa_vllm.eval.metrics.lm_loss`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from .metrics import loss_report

if TYPE_CHECKING:
    from .tasks import Sample


class ServedModelError(RuntimeError):
    """The server cannot be reached or does not serve what was asked; the message names the URL."""


class ServedModel:
    """A completions endpoint of an OpenAI-compatible server (``URL`` ends at the host or at ``/v1``)."""

    def __init__(self, url: str, model: str | None = None, api_key: str = "EMPTY", timeout: float = 600.0):
        from openai import OpenAI

        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = OpenAI(base_url=base, api_key=api_key, timeout=timeout, max_retries=0)
        try:
            served = [m.id for m in self.client.models.list().data]
        except Exception as e:  # connection refused, timeouts, HTTP errors: all mean "no usable server"
            raise ServedModelError(f"--served-url {url}: cannot list the served models ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())})") from None
        if model is not None and model not in served:
            raise ServedModelError(f"--served-model {model}: not served at {url} (it serves: {', '.join(served)})")
        if not served:
            raise ServedModelError(f"--served-url {url}: the server lists no model")
        self.model = model or served[0]

    def score_retrieval(self, samples: Sequence["Sample"]) -> list[bool]:
        """Per sample: does the greedy completion start with the answer ids."""
        out = []
        for s in samples:
            r = self.client.completions.create(model=self.model, prompt=s.prompt_ids, max_tokens=len(s.answer_ids),
                                               temperature=0.0,
                                               extra_body={"return_token_ids": True, "ignore_eos": True})
            got = list(getattr(r.choices[0], "token_ids", None) or [])
            out.append(got[:len(s.answer_ids)] == list(s.answer_ids))
        return out

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """Logprob of each prompt token given the ones before it (``len(ids) - 1`` values)."""
        r = self.client.completions.create(model=self.model, prompt=list(ids), max_tokens=0, echo=True,
                                           logprobs=1, temperature=0.0)
        lps = r.choices[0].logprobs.token_logprobs
        if lps is None or len(lps) != len(ids):
            raise RuntimeError(f"server returned {0 if lps is None else len(lps)} prompt logprobs for "
                               f"{len(ids)} tokens; it must support echo with logprobs (vLLM does)")
        return [float(x) for x in lps[1:]]

    def lm_loss(self, sequences, window: int) -> dict[str, Any]:
        """Same report as :func:`consa_vllm.eval.metrics.lm_loss`, from the server's prompt logprobs."""
        # Each row's NLL of positions 1 .. T-1 (row[c] is position c + 1); a non-finite logprob counts as 1e9.
        rows = [[-lp if math.isfinite(lp) else 1e9 for lp in self.token_logprobs(seq)] for seq in sequences.tolist()]
        T, n = sequences.shape[1], len(rows)
        nll = [0.0] + [sum(col) for col in zip(*rows)]  # summed over the rows, by position
        # Every row has a target at each position 1 .. T-1; row[c] is position c + 1, so row[window:]
        # are the targets beyond the window.
        per_sequence = [sum(row[window:]) / len(row[window:]) for row in rows] if T - 1 > window else []
        return loss_report(nll, [0] + [n] * (T - 1), per_sequence, window, n)
