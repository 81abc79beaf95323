"""``consa-vllm serve`` started as a user starts it, for the tests that talk HTTP to it.

One server per test module: each start costs a minute or more on a 2-core CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_S = float(os.environ.get("CONSA_TEST_SERVER_TIMEOUT", 300))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


@contextmanager
def consa_serve(model_dir: Path, log_path: Path, *, max_model_len: int, max_num_seqs: int = 8,
                drop_env: Sequence[str] = (), extra_args: Sequence[str] = ()) -> Iterator[dict]:
    """Run ``consa-vllm serve MODEL`` on a free loopback port until /health answers; stop it after.

    Yields ``{"base", "model", "log", "proc", "dump"}``; ``dump(reason)`` returns the reason
    followed by the end of the server log, for failure messages. ``drop_env`` names
    environment variables the server must not inherit; ``extra_args`` go to vLLM (``--api-key K``).
    """
    port = free_port()
    model = str(model_dir)
    cmd = [sys.executable, "-m", "consa_vllm.cli", "serve", model,
           "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
           "--max-num-seqs", str(max_num_seqs), *extra_args]
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(log_path, "wb")
    t0 = time.monotonic()
    # Own session, so teardown can stop the API server and the engine process it spawned.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def dump(reason: str) -> str:
        log.flush()
        return f"{reason}\n--- server log ({log_path}) ---\n{Path(log_path).read_text(errors='replace')[-20000:]}"

    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(dump(f"server exited with status {proc.returncode} before /health answered"))
            if http_get(base + "/health", timeout=5)[0] == 200:
                break
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(dump(f"server not healthy after {START_TIMEOUT_S:.0f} s"))
            time.sleep(1.0)
        print(f"\nconsa-vllm serve: healthy after {time.monotonic() - t0:.1f} s")
        yield {"base": base, "model": model, "log": log_path, "proc": proc, "dump": dump}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # The engine core is a child in the same session: make sure nothing outlives the module.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
