"""``consa-vllm serve`` started as a user starts it, for the tests that talk HTTP to it.

The server process is the package's own (:class:`consa_vllm.server_process.ServerProcess`,
which ``consa-vllm demo`` uses too). One server per test module: each start costs a minute
or more on a 2-core CPU. Tests using it are marked ``engine``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from consa_vllm.server_process import ServerError, ServerProcess, free_port, http_get

__all__ = ["START_TIMEOUT_S", "consa_serve", "free_port", "http_get"]

START_TIMEOUT_S = float(os.environ.get("CONSA_TEST_SERVER_TIMEOUT", 300))


@contextmanager
def consa_serve(model_dir: Path, log_path: Path, *, max_model_len: int, max_num_seqs: int = 8,
                drop_env: Sequence[str] = (), extra_args: Sequence[str] = ()) -> Iterator[dict]:
    """Run ``consa-vllm serve MODEL`` on a free loopback port until /health answers; stop it after.

    Yields ``{"base", "model", "log", "proc", "dump"}``; ``dump(reason)`` returns the reason
    followed by the end of the server log, for failure messages. ``drop_env`` names
    environment variables the server must not inherit; ``extra_args`` go to vLLM (``--api-key K``).
    """
    model = str(model_dir)
    args = ("--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
            "--max-num-seqs", str(max_num_seqs), *extra_args)
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    server = ServerProcess(model, free_port(), log_path, args=args, env=env)

    def dump(reason: str) -> str:
        return f"{reason}\n--- server log ({log_path}) ---\n{server.read_log()[-20000:]}"

    server.start()
    try:
        try:
            took = server.wait_healthy(START_TIMEOUT_S, poll_s=1.0)
        except ServerError as e:
            pytest.fail(dump(str(e)))
        print(f"\nconsa-vllm serve: healthy after {took:.1f} s")
        yield {"base": server.base, "model": model, "log": log_path, "proc": server.proc, "dump": dump}
    finally:
        server.stop()
