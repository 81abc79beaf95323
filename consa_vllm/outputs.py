"""Output paths of the commands: checked before any work, never left half-written.

- :func:`output_problem` says why a path cannot be written (a parent that is a file, a
  folder without write permission, an existing file without ``--force``, one of the
  command's own inputs or other outputs) before a command reads a model or trains, so the
  command can stop with one line naming its flag, and nothing is lost after the work.
- :func:`make_temp_dir` makes the folder a result is built in, beside its destination,
  with ordinary permissions (0777 less the umask, not ``mkdtemp``'s 0700). Its name
  records the host and the process id, so :func:`remove_stale_temps` can tell the folders
  that a killed run (SIGKILL, a power cut) left behind from those of a run still going.
- :func:`signals_raise` turns SIGTERM and SIGHUP (``kill``, ``docker stop``, a closed
  terminal) into :class:`Interrupted`, a ``KeyboardInterrupt``, so the clean-up that runs
  on Ctrl-C runs then too; :func:`signals_held` defers them over a step that must not be
  split (two renames).
- :func:`fsync_dir` makes the renames in a folder durable.

Standard library only: the vLLM plugin loader imports modules that import this one.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

#: This machine's name as it appears in temporary folder names ('-' is the field separator).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


#: A labelled path: ``("--out", "a.json")``, ``("ALLOC", "g.json")``. None or "" stands for a flag not given.
Named = tuple[str, "str | os.PathLike | None"]


def output_problem(path: str | os.PathLike, kind: Literal["file", "folder", "contents"] = "file", *,
                   force: bool | None = None, others: Iterable[Named] = (),
                   read_folders: Iterable[Named] = ()) -> str | None:
    """Why ``path`` cannot be written, or None when it can. Creates and changes nothing.

    ``kind``: ``"file"``, a file written (or replaced) through a rename in its folder;
    ``"folder"``, a folder built beside it and renamed into place; ``"contents"``, a folder
    (created if missing) whose files are written in place. Missing parents are fine when
    the nearest existing one is a writable folder (they are created then).

    ``force`` (files only): False refuses an existing file ("pass --force"), True allows
    replacing it, None leaves that to the caller. ``others``: the command's inputs and its
    other outputs, which writing ``path`` must not destroy (see :func:`clash`), even with
    ``force``; ``read_folders``: folders whose every file the command reads (training
    data), where nothing may be written.
    """
    p = Path(path)
    if kind == "file" and p.is_dir():
        return "is a directory, expected a file to write"
    if kind != "file" and p.exists() and not p.is_dir():
        return "exists and is not a directory"
    problem = clash(p, others, read_folders)
    if problem:
        return problem
    if kind == "file" and force is False and p.exists():
        return "already exists; pass --force to overwrite it"
    where = p if kind == "contents" and p.is_dir() else p.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    if not where.is_dir():
        return f"cannot be created: {where} is a file (Not a directory)"
    try:  # the real test (permissions, ACLs, read-only or immutable folders); leaves no name
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        return f"cannot write in {where} ({e.strerror})"
    return None


def clash(path: str | os.PathLike, others: Iterable[Named], read_folders: Iterable[Named] = ()) -> str | None:
    """Which of ``others`` writing ``path`` would destroy, as the end of a one-line message, or None.

    Refused: ``path`` is one of them (the same path, symbolic links resolved), or lies
    inside one of ``read_folders`` (a later run would read it as data).
    """
    p = _resolved(path)
    for label, other in others:
        if other is not None and str(other) != "" and p == _resolved(other):
            return f"is the same path as {label} {other}; choose another path"
    for label, folder in read_folders:
        if folder is not None and str(folder) != "" and Path(folder).is_dir() and _resolved(folder) in p.parents:
            return (f"is inside {label} {folder}, whose files are all read as data (a later run would read "
                    "this one too); choose a path outside it")
    return None


def _resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with its symbolic links resolved (it need not exist)."""
    return Path(os.path.realpath(path))


def make_temp_dir(dst: str | os.PathLike, kind: str = "consa-tmp") -> Path:
    """A new empty folder ``.<name>.<kind>-<host>-<pid>-<random>`` beside ``dst``."""
    dst = Path(dst)
    for _ in range(100):
        path = dst.parent / f".{dst.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)  # the umask applies, as to any folder the user makes
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{dst.parent}: no free temporary folder name")  # pragma: no cover


def stale_temps(dst: str | os.PathLike, kind: str = "consa-tmp") -> list[Path]:
    """Folders :func:`make_temp_dir` made beside ``dst`` on this host for processes that are gone."""
    dst = Path(dst)
    prefix = f".{dst.name}.{kind}-"
    try:
        entries = sorted(dst.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        fields = entry.name[len(prefix):].rsplit("-", 2)
        if len(fields) != 3 or fields[0] != _HOST or not fields[1].isdigit():
            continue  # another host's (a shared file system) or not ours: leave it
        if not _alive(int(fields[1])):
            found.append(entry)
    return found


def remove_stale_temps(dst: str | os.PathLike, kind: str = "consa-tmp") -> list[Path]:
    """Delete :func:`stale_temps`; returns what was deleted."""
    removed = stale_temps(dst, kind)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush the entries of folder ``path`` (files made or renamed in it) to disk.

    ``os.replace`` and ``fsync`` of a file do not make the rename itself durable: after a power
    cut the folder may show the old entry. Where a folder cannot be opened or synced (some
    platforms and file systems), nothing is done: the rename is then as durable as it gets.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ------------------------------------------------------------------ signals


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) raised as an exception, as Ctrl-C raises SIGINT's."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(e: KeyboardInterrupt) -> tuple[str, int]:
    """``(name, exit status)`` of the signal behind ``e``: ``("SIGTERM", 143)``, ``("SIGINT", 130)``."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    return signal.Signals(signum).name, 128 + int(signum)


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only).

    A signal the process ignores (``nohup`` ignores SIGHUP) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for s in _TERMINATING:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, raise_)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Defer SIGINT, SIGTERM and SIGHUP until the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, *_TERMINATING}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
