"""``consa-vllm serve`` as a child process: start it, wait until ``/health`` answers, stop it.

The one server manager of the project: ``consa-vllm demo`` and the tests that talk HTTP to
a real server (``tests/server_harness.py``) both use :class:`ServerProcess`.

The server runs in its own session (process group), logging to a file. vLLM's API server
starts an engine-core process of its own; stopping the whole group makes sure that nothing
outlives the caller. Only the standard library is used here: no torch or vLLM import.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Seconds a healthy server gets to shut down after SIGTERM before its group is killed.
STOP_GRACE_S = 30.0
#: The same for a server that never answered /health (vLLM interrupts its start-up on
#: SIGTERM, so this is quick when it works at all).
STOP_GRACE_STARTING_S = 5.0


class ServerError(RuntimeError):
    """The server exited before ``/health`` answered, or did not answer in time."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def serve_command(model: str | os.PathLike, port: int, host: str = "127.0.0.1",
                  args: Sequence[str] = ()) -> list[str]:
    """The ``consa-vllm serve`` command line, run with this interpreter (``python -m consa_vllm.cli``)."""
    return [sys.executable, "-m", "consa_vllm.cli", "serve", str(model), "--host", host, "--port", str(port),
            *args]


class ServerProcess:
    """``consa-vllm serve MODEL ARGS`` on ``host:port`` in its own session, logging to ``log_path``.

    ``env`` is the server's whole environment (default: this process's); when it does not
    set ``VLLM_CPU_KVCACHE_SPACE`` the server gets 1 GiB, plenty for the tiny models of the
    demo and the tests (``consa-vllm serve`` would default to more).
    """

    def __init__(self, model: str | os.PathLike, port: int, log_path: str | os.PathLike, *,
                 args: Sequence[str] = (), host: str = "127.0.0.1", env: Mapping[str, str] | None = None):
        self.cmd = serve_command(model, port, host, args)
        self.base = f"http://{host}:{port}"
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.proc: subprocess.Popen | None = None
        self.healthy = False

    def start(self) -> None:
        """Start the server (returns at once; see :meth:`wait_healthy`)."""
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)

    def wait_healthy(self, timeout: float, on_wait: Callable[[float], None] | None = None,
                     poll_s: float = 0.5) -> float:
        """Poll ``/health`` until it answers 200; return the seconds it took.

        ``on_wait(elapsed)`` is called after each unanswered poll (progress output). Raises
        :class:`ServerError` when the server exits first or ``timeout`` seconds pass.
        """
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with status {self.proc.returncode} before /health answered")
            if http_get(self.base + "/health", timeout=2)[0] == 200:
                self.healthy = True
                return elapsed
            if elapsed > timeout:
                raise ServerError(f"the server did not answer /health within {timeout:.0f}s")
            if on_wait is not None:
                on_wait(elapsed)
            time.sleep(poll_s)

    def read_log(self) -> str:
        """The server's log so far ("(no log)" when there is none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the server (vLLM shuts its engine down), then kill whatever is left of its group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S if self.healthy else STOP_GRACE_STARTING_S)
            except subprocess.TimeoutExpired:
                pass
        # The engine core is a child in the same group: nothing may outlive the caller.
        kill_group(self.proc)

    def kill(self) -> None:
        """Kill the server's whole group at once (a second Ctrl-C)."""
        if self.proc is not None:
            kill_group(self.proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
