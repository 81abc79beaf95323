"""What both testbed versions (``run.py``, ``run_v2.py``) share: the common command-line options,
the checks before a run, the phase loop, and the record of the device and of each phase's wall time.

Each version keeps its own sizes, phases and report; this module only drives them, so that a
fix to the resumable phase loop or the settings check reaches both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from pydantic import BaseModel

#: The phases of both versions, in the order ``--phase all`` runs them.
PHASES = ("corpus", "pretrain", "allocations", "stage2", "eval", "report")

#: Exit status of a run whose time budget ran out: run the same command again to continue.
UNFINISHED = 3


def log(msg: str) -> None:
    """One progress line, timestamped, flushed at once (the GPU machine's logs are read mid-run)."""
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_parser(prog: str, description: str | None, results_help: str) -> argparse.ArgumentParser:
    """The options both versions take: ``--out``, ``--phase``, ``--smoke``, ``--max-minutes``,
    ``--device`` and ``--results-dir`` (whose help says what that version copies)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; reruns continue in it)")
    p.add_argument("--phase", choices=("all", *PHASES), default="all", help="run one phase (default: all)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, float32 (checks the pipeline only)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after about this long, resumable: rerun the same command to continue "
                        "(default: no limit)")
    p.add_argument("--device", default=None, help="override the device (default: cuda, or cpu with --smoke)")
    p.add_argument("--results-dir", metavar="DIR", default=None, help=results_help)
    return p


def open_run(p: argparse.ArgumentParser, args: argparse.Namespace, s: BaseModel) -> tuple[BaseModel, Path]:
    """Apply ``--device`` to the settings ``s``, check the device, and claim ``--out``.

    A run directory pins its settings in ``settings.json``: one that holds a run with other
    settings is refused (one error line, exit status 2), since its finished phases would be
    skipped and mixed into the new run's results. The saved file is read as the settings class,
    so a field added since it was written takes its default: defaults keep what older runs did,
    and a run made before the field existed still continues (``gpu_v2.sh restore``).
    Returns the settings and the directory.
    """
    if args.device:
        s = s.model_copy(update={"device": args.device})
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.exit(2, f"{p.prog}: error: --device {s.device}: CUDA is not available (use --smoke on CPU)\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "settings.json"
    mine = s.model_dump_json()
    if saved.exists() and not same_settings(s, saved):
        p.exit(2, f"{p.prog}: error: --out {out}: holds a run with other settings ({saved}); use a new DIR\n")
    if not saved.exists():
        # Atomically: sharded phases start several processes at once, and one of them must
        # never read a half-written file.
        tmp = saved.with_name(f"{saved.name}.{os.getpid()}.tmp")
        tmp.write_text(mine + "\n")
        tmp.replace(saved)
    return s, out


def same_settings(s: BaseModel, saved: Path) -> bool:
    """Whether ``saved`` (a run's ``settings.json``) holds the settings ``s``; fields it lacks
    count as their defaults, and a file that is not such settings (unknown fields included) does not."""
    try:  # the settings classes forbid unknown fields; pydantic's ValidationError is a ValueError
        return type(s).model_validate_json(saved.read_text()) == s
    except ValueError:
        return False


def run_phases(args: argparse.Namespace, out: Path, phases: Mapping[str, Callable[[float | None], bool]],
               report: Callable[[], object], publish: Callable[[Path, Path], None],
               record_seconds: bool = True) -> int:
    """Run ``--phase`` (every phase in order for ``all``) within ``--max-minutes``; return the exit status.

    ``phases`` maps each phase but the report to a function of the minutes left (None: no
    limit) that returns False when the budget ran out before it finished; it must skip finished
    work, so that a rerun continues. ``report()`` writes the results, then ``publish(out, DIR)``
    copies them to ``--results-dir`` when given. Each phase's wall time is added to
    ``phase-seconds.json`` unless ``record_seconds`` is False (parallel shards would race on the
    file). Returns 0 when done, :data:`UNFINISHED` when the budget ran out.
    """
    t0 = time.time()
    for ph in PHASES if args.phase == "all" else (args.phase,):
        left = None if args.max_minutes is None else args.max_minutes - (time.time() - t0) / 60
        if left is not None and left <= 0:
            log(f"time budget spent before phase {ph}; rerun the same command to continue")
            return UNFINISHED
        if ph == "report":
            report()
            if args.results_dir:
                publish(out, Path(args.results_dir))
            continue
        t_phase = time.time()
        finished = phases[ph](left)
        if record_seconds:
            add_phase_seconds(out, ph, time.time() - t_phase)
        if not finished:
            return UNFINISHED
    log(f"done in {time.time() - t0:.0f} s")
    return 0


def phase_seconds(out: Path) -> dict[str, float]:
    """Wall seconds per phase of the run in ``out``, summed over the reruns (empty before any)."""
    path = out / "phase-seconds.json"
    return json.loads(path.read_text()) if path.exists() else {}


def add_phase_seconds(out: Path, phase: str, seconds: float) -> None:
    """Add ``seconds`` to ``phase``'s wall time in ``out/phase-seconds.json``."""
    times = phase_seconds(out)
    times[phase] = round(times.get(phase, 0.0) + seconds, 1)
    (out / "phase-seconds.json").write_text(json.dumps(times, indent=1) + "\n")
