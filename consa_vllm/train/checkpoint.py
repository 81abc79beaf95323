"""Atomic checkpoints: tensors in safetensors, everything else in JSON. No pickle anywhere.

Layout: ``<log_dir>/checkpoints/step_00000100/{tensors.safetensors,state.json}`` and a
``latest`` file naming the newest one. A checkpoint is written into a temporary folder
(``.tmp-step_*``) and renamed into place; one written again (after a resume from an earlier
step) first moves the old one aside (``.old-step_*``). A kill therefore leaves either the old
or the new checkpoint, never half of one, and :func:`recover_interrupted_writes` (run when a
run resumes) puts a moved-aside checkpoint back and removes the leftovers.
Nested state (optimizer state dicts, RNG states) is flattened: tensors go to safetensors
under a path key, the rest of the structure to JSON with ``{"__tensor__": key}`` leaves.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from consa_vllm.allocation import atomic_write_text
from consa_vllm.outputs import fsync_dir

TENSORS = "tensors.safetensors"
STATE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupted); the message names the file."""


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference; collect tensors by key."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = [[k, flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: v for k, v in items}}
        return {"__items__": items}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"].items()}
        return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        states = list(st["cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(ckpt_root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dicts of tensors and JSON values) as checkpoint ``step``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        tree = flatten(state, "s", tensors)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps({"step": step, "state": tree}))
        for f in (TENSORS, STATE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
    except BaseException:  # interrupted or disk full: no half-written checkpoint folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-written after a resume: swap, then drop the old one
        old = ckpt_root / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a kill from here to the next rename: recover_interrupted_writes puts it back
        os.replace(tmp, final)
        fsync_dir(ckpt_root)  # the new checkpoint is in place on disk before the old one goes
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_root)  # durable before "latest" names it
    atomic_write_text(ckpt_root / "latest", name + "\n")
    fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def recover_interrupted_writes(ckpt_root: Path) -> list[str]:
    """Undo what a :func:`save_checkpoint` killed midway left in ``ckpt_root``; returns notes of what was done.

    A ``.old-step_*`` folder beside its ``step_*`` is the replaced checkpoint: removed. One
    without it was moved aside by a re-write killed between its two renames: put back, as if
    that write had not started (its run resumes from a checkpoint and writes it again). A
    ``.tmp-step_*`` folder is an unfinished or unplaced write: removed. Call it in one process
    only, before the checkpoints are read.
    """
    notes = []
    if not ckpt_root.is_dir():
        return notes
    for old in sorted(ckpt_root.glob(".old-step_*")):
        final = ckpt_root / old.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            notes.append(f"removed {old}, a replaced checkpoint that an interrupted write left")
        else:
            os.replace(old, final)
            notes.append(f"restored {final} from {old}, where a write interrupted while replacing it had moved it")
    for tmp in sorted(ckpt_root.glob(".tmp-step_*")):
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp}, an unfinished checkpoint write")
    if notes:
        fsync_dir(ckpt_root)
    return notes


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if (p / STATE).is_file() and (p / TENSORS).is_file())


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        p = ckpt_root / pointer.read_text().strip()
        if (p / STATE).is_file():
            return p
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """``(step, state)`` as saved by :func:`save_checkpoint`; :class:`CheckpointError` names a bad file."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE).read_text())
        step, tree = int(meta["step"]), meta["state"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE} is unreadable, truncated or corrupted ({_reason(e)})") from None
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise CheckpointError(f"{path / TENSORS} is unreadable, truncated or corrupted ({_reason(e)})") from None
    try:
        return step, unflatten(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE} does not match {path / TENSORS} ({_reason(e)})") from None


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is complete; cheap, no tensor is read.

    ``state.json`` must parse, and ``tensors.safetensors`` must have a readable header and be
    exactly as long as that header says (a truncated copy or an interrupted download is not).
    """
    path = Path(path)
    try:
        meta = json.loads((path / STATE).read_text())
        int(meta["step"]), meta["state"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE} is unreadable, truncated or corrupted ({_reason(e)})") from None
    f = path / TENSORS
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = os.path.getsize(f)
        if size != 8 + n + end:
            raise ValueError(f"{size} bytes where its header describes {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise CheckpointError(f"{f} is unreadable, truncated or corrupted ({_reason(e)})") from None


def read_settings(path: Path) -> tuple[dict[str, Any], bool, int | None]:
    """``(the trainer settings, whether FSDP was on, the number of processes)`` of checkpoint
    ``path``, from its ``state.json`` alone (no tensor is read); the number of processes is
    None in a checkpoint written before it was recorded. :class:`CheckpointError` names a bad file."""
    path = Path(path)
    try:
        tree = json.loads((path / STATE).read_text())["state"]["__dict__"]
        config = unflatten(tree["config"], {})
        if not isinstance(config, dict):
            raise TypeError(f"'config' is a {type(config).__name__}")
        world = tree.get("world_size")
        if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
            raise ValueError(f"'world_size' is {world!r}")
        return config, bool(tree.get("fsdp")), world
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE} is unreadable, truncated or corrupted ({_reason(e)})") from None


def intact_before(path: Path) -> Path | None:
    """The newest checkpoint older than ``path`` (beside it) that :func:`verify_checkpoint` accepts."""
    path = Path(path)
    for older in reversed(list_checkpoints(path.parent)):
        if older.name < path.name:
            try:
                verify_checkpoint(older)
            except CheckpointError:
                continue
            return older
    return None


def explain_bad_checkpoint(error: CheckpointError, path: Path) -> str:
    """``error`` plus which earlier checkpoint to resume from instead (one line, for ``--resume``)."""
    intact = intact_before(path)
    hint = (f"the earlier checkpoint {intact} is intact: resume from it with --resume {intact}" if intact
            else "no earlier checkpoint is intact: start again without --resume (with --force)")
    return f"--resume: {error}; {hint}"


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]
