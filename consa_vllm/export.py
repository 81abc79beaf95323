"""Export a Hugging Face checkpoint plus an allocation as a checkpoint the vLLM plugin serves.

What the exported directory holds (``DST``):

- ``config.json``: the source config with
  - ``architectures`` = ``["Consa" + original]`` (e.g. ``ConsaQwen3ForCausalLM``), the name
    the ``consa`` vLLM plugin registers;
  - ``consa``: the allocation (``Allocation.to_dict()``) plus ``base_architecture``, the
    original architecture name;
  - no active global sliding window. vLLM reads ``sliding_window`` from the HF config and,
    when no layer types say otherwise, turns it into ``cache_config.sliding_window``,
    which silently makes *every* attention module sliding (docs/DESIGN.md §7, Traps). So
    ``sliding_window`` is written as ``null`` where the source had the key (or where the
    HF config class would default it to a number: Mistral), ``use_sliding_window`` is
    ``false`` where present, and ``layer_types``, where present, is all
    ``"full_attention"``. The per-head windows live only under ``consa``.
- weights (``*.safetensors``, their index, legacy ``*.bin``): hard-linked (falling back to
  a copy across filesystems) or copied;
- every other top-level file (tokenizer files, ``generation_config.json``, chat template,
  README...): copied.

``DST`` is never half-written: everything is built in a temporary directory next to it
and renamed into place at the end. Everything is validated before anything is written.
SIGTERM and SIGHUP are handled like Ctrl-C (the temporary directory is removed), and the
temporary directories that a killed export (SIGKILL) left behind are removed by the next
export to the same ``DST``. The directory and ``config.json`` get ordinary permissions
(0777/0666 less the umask; a ``--force`` export in place keeps the old directory's mode).

The allocation's provenance is copied without machine paths (the trainer's data and log
folders, the source model's directory), which every client of ``/v1/consa/allocation``
and everyone the checkpoint is shared with would see; ``keep_paths=True`` keeps them.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

from .allocation.format import Allocation, AllocationError, atomic_write_text, describe_json, read_json_object
from . import families
from .allocation.shape import ModelShape
from .outputs import (fsync_dir, make_temp_dir, output_problem, remove_stale_temps, signals_held, signals_raise,
                      stale_temps)

CONFIG_KEY = "consa"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


class ExportError(ValueError):
    """The export cannot be done; the message names the file and the field at fault."""


class DestinationError(ExportError):
    """The destination (``out_dir``, the CLI's ``--out``) cannot be written or replaced; the
    message starts with its path, so the CLI can name its flag in front of it."""


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during an export; the message says what state ``DST`` is in."""


#: Trainer settings (``training.args``) kept in an exported checkpoint: the method and the
#: optimisation, none of the machine's paths (model, data, tokenizer, out, log_dir, ...).
PUBLIC_TRAINING_ARGS = ("seq_len", "max_tokens", "text_field", "target_sparsity", "granularity", "constraint",
                        "window", "init_log_alpha", "target_warmup", "steps", "batch_size", "grad_accum", "lr",
                        "gate_lr", "lagrangian_lr", "grad_clip", "freeze_weights", "stage2_steps", "seed",
                        "dtype", "fsdp")
#: The trainer settings that are paths (reported when left out).
TRAINING_PATH_ARGS = ("model", "data", "tokenizer", "out", "log_dir", "save_model", "allocation", "resume")
#: Provenance fields that hold paths of the machine that made the allocation.
PATH_FIELDS = ("model", "allocation_file")


# ---------------------------------------------------------------------------- reading


def consa_architecture(base: str) -> str:
    """``Qwen3ForCausalLM`` -> ``ConsaQwen3ForCausalLM`` (the family registry's name)."""
    return families.by_architecture(base).consa_architecture


def read_exported_allocation(config: Any, source: str | os.PathLike | None = None) -> Allocation:
    """The allocation embedded in an exported checkpoint, validated against its shape.

    ``config`` is a model directory, a path to its ``config.json``, a parsed
    ``config.json`` dict, or a ``transformers.PretrainedConfig``. Raises
    :class:`AllocationError` whose message names ``config.json`` (or ``source``) and the field.
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        cfg_path = path if path.suffix == ".json" and not path.is_dir() else path / "config.json"
        data = _read_config(cfg_path, error=AllocationError)
        where = str(cfg_path)
    elif isinstance(config, Mapping):
        data, where = dict(config), "config.json"
    elif hasattr(config, "to_dict"):
        data, where = config.to_dict(), "config.json"
        # PretrainedConfig.to_dict() keeps unknown keys; be safe if a subclass drops it.
        if CONFIG_KEY not in data and hasattr(config, CONFIG_KEY):
            data[CONFIG_KEY] = getattr(config, CONFIG_KEY)
    else:
        raise TypeError(f"expected a model directory, a config.json path, a dict or a PretrainedConfig, "
                        f"got {type(config).__name__}")
    if source is not None:
        where = str(source)

    raw = data.get(CONFIG_KEY)
    if raw is None:
        raise AllocationError(
            f"{where}: field '{CONFIG_KEY}' is missing: not a ConSA checkpoint "
            "(export one with `consa-vllm export --model SRC --allocation A.json --out DST`)"
        )
    if not isinstance(raw, Mapping):
        raise AllocationError(f"{where}: field '{CONFIG_KEY}' must be a JSON object, got {describe_json(raw)}")
    alloc = Allocation.from_dict(dict(raw), source=f"{where} (field '{CONFIG_KEY}')")
    try:
        shape = ModelShape.from_config(data)
    except (ValueError, TypeError) as e:
        raise AllocationError(f"{where}: {e}") from None
    alloc.check_model(shape.num_layers, shape.num_kv_heads, source=f"{where} (field '{CONFIG_KEY}.pattern')")
    return alloc


def base_architecture(config: Mapping[str, Any], where: str = "config.json") -> str:
    """The original architecture of a plain or already-exported checkpoint's config."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ExportError(f"{where}: field 'architectures' must be a list with one name, got {archs!r}")
    arch = archs[0]
    consa = config.get(CONFIG_KEY)
    if isinstance(consa, Mapping) and consa.get("base_architecture"):
        base = consa["base_architecture"]
        if base not in families.hf_architectures():
            raise ExportError(
                f"{where}: field '{CONFIG_KEY}.base_architecture' is {base!r}, which ConSA cannot serve; "
                f"supported: {families.supported_summary()}")
        if arch != consa_architecture(base):
            raise ExportError(
                f"{where}: field 'architectures' is {arch!r} but '{CONFIG_KEY}.base_architecture' is "
                f"{base!r} (expected {consa_architecture(base)!r})"
            )
        arch = base
    try:
        return families.by_architecture(arch).hf_architecture
    except families.UnsupportedFamilyError:
        raise ExportError(
            f"{where}: field 'architectures' is {archs[0]!r}, which ConSA cannot serve; "
            f"supported: {families.supported_summary()}"
        ) from None


# ---------------------------------------------------------------------------- writing


def public_provenance(fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``fields`` (an allocation's JSON) without machine paths, and the dotted names left out.

    Dropped: the trainer's settings other than :data:`PUBLIC_TRAINING_ARGS` (so its model,
    data, tokenizer, output and log paths), the fields in :data:`PATH_FIELDS` at any depth,
    and any other string that is an absolute path. Kept: the method, the target, the steps,
    the seed, the data hash (``training.data_sha256``), losses and gate values.
    """
    dropped: list[str] = []

    def clean(value: Any, name: str) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                key = f"{name}.{k}" if name else str(k)
                if k in PATH_FIELDS and isinstance(v, str):
                    dropped.append(key)
                elif k == "args" and name.endswith("training") and isinstance(v, Mapping):
                    # The paths are named; runtime settings (--device, --progress) go quietly.
                    dropped.extend(f"{key}.{a}" for a, x in v.items() if a in TRAINING_PATH_ARGS and x)
                    out[k] = {a: clean(x, f"{key}.{a}") for a, x in v.items() if a in PUBLIC_TRAINING_ARGS}
                else:
                    out[k] = clean(v, key)
            return {k: v for k, v in out.items() if v is not _DROP}
        if isinstance(value, list):
            return [x for x in (clean(x, f"{name}[{i}]") for i, x in enumerate(value)) if x is not _DROP]
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            dropped.append(name)
            return _DROP
        return value

    return clean(fields, ""), dropped


_DROP = object()


def covers_every_position(allocation: Allocation, config: Mapping[str, Any], where: str = "config.json") -> str | None:
    """The warning for an allocation whose S heads see every position the model takes, or None.

    An S head sees keys ``0..sink-1`` and ``i-W+1..i``: when ``sink + window`` reaches the
    model's ``max_position_embeddings``, that is every earlier key of any sequence the model
    takes, so the S heads act as full attention and save no KV memory (a mistake, usually).
    """
    max_pos = config.get("max_position_embeddings")
    a = allocation
    if not isinstance(max_pos, int) or isinstance(max_pos, bool) or a.sparsity == 0 or a.sink + a.window < max_pos:
        return None
    span = f"sink {a.sink} + window {a.window}" if a.sink else f"window {a.window}"
    return (f"{span} >= the model's max_position_embeddings {max_pos} ({where}): the sliding-window (S) heads "
            "see every token of any sequence the model takes, so they act as full attention and save no KV memory")


def exported_config(config: Mapping[str, Any], allocation: Allocation, where: str = "config.json",
                    keep_paths: bool = False) -> dict[str, Any]:
    """The ``config.json`` of the exported checkpoint (pure: no I/O).

    The allocation's provenance loses its machine paths (:func:`public_provenance`) unless
    ``keep_paths``.
    """
    base = base_architecture(config, where)
    if config.get("dual_chunk_attention_config"):
        # The served model would be refused (consa_vllm.plugin.config): say so before writing.
        raise ExportError(f"{where}: field 'dual_chunk_attention_config' is set, but ConSA attention does not "
                          "implement dual-chunk attention (vllm serve would refuse the export); remove the field "
                          "from the source config.json to export the model with ordinary attention")
    shape = ModelShape.from_config(dict(config))
    allocation.check_model(shape.num_layers, shape.num_kv_heads)
    out = dict(config)
    notes: dict[str, Any] = {}
    covered = covers_every_position(allocation, config, where)
    if covered:
        warnings.warn(covered, stacklevel=3)

    # No global sliding window that vLLM could read (docs/DESIGN.md §7, Traps).
    sw = out.get("sliding_window")
    use_sw = out.get("use_sliding_window")
    sw_active = sw not in (None, 0) and use_sw is not False
    if sw_active:
        notes["base_sliding_window"] = sw
    if "sliding_window" in out or families.by_architecture(base).sliding_window_default:
        out["sliding_window"] = None
    if "use_sliding_window" in out:
        out["use_sliding_window"] = False
    layer_types = out.get("layer_types")
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            notes["base_layer_types"] = list(layer_types)
        out["layer_types"] = ["full_attention"] * shape.num_layers
    if notes and CONFIG_KEY not in config:
        warnings.warn(
            f"{where}: the source model uses sliding-window attention of its own ({notes}); the exported "
            "checkpoint uses only the ConSA allocation's windows (the source settings are kept under "
            f"'{CONFIG_KEY}')",
            stacklevel=3,
        )
    prev = config.get(CONFIG_KEY)
    if isinstance(prev, Mapping):  # re-export: keep what the first export recorded about the base
        for k in ("base_sliding_window", "base_layer_types"):
            if k in prev and k not in notes:
                notes[k] = prev[k]

    out["architectures"] = [consa_architecture(base)]
    fields = allocation.to_dict() if keep_paths else public_provenance(allocation.to_dict())[0]
    out[CONFIG_KEY] = {**fields, "base_architecture": base, **notes}
    return out


def export_model(
    src: str | os.PathLike,
    allocation: Allocation | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    link: bool = True,
    force: bool = False,
    keep_paths: bool = False,
) -> Path:
    """Write ``out_dir``: ``src`` with ``allocation`` embedded, servable by the consa plugin.

    ``link=True`` hard-links the weight files (falling back to a copy where the filesystem
    cannot link), ``link=False`` copies them. An existing ``out_dir`` is refused unless
    ``force``, and even then unless it is empty or a model checkpoint (it has a
    ``config.json``: an earlier export), so no other folder is deleted. ``src`` may itself
    be an exported ConSA checkpoint (re-export with a new allocation; ``src == out_dir`` with
    ``force`` works too). ``keep_paths`` keeps the machine paths of the allocation's
    provenance. Returns ``out_dir``.

    All checks run before anything is written; ``out_dir`` is never left half-written.
    Ctrl-C, SIGTERM or SIGHUP raise :class:`ExportInterrupted` after the clean-up.
    """
    src_dir, dst = Path(src), Path(out_dir)
    config, weights, others = _check_source(src_dir)
    alloc = _load_allocation(allocation)
    cfg_path = src_dir / "config.json"
    try:
        shape = ModelShape.from_config(config)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{cfg_path}: {e}") from None
    alloc_src = allocation if isinstance(allocation, (str, os.PathLike)) else "allocation"
    try:
        alloc.check_model(shape.num_layers, shape.num_kv_heads, source=alloc_src)
    except AllocationError as e:
        raise AllocationError(f"{e} (model: {cfg_path})") from None
    new_config = exported_config(config, alloc, where=str(cfg_path), keep_paths=keep_paths)

    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise DestinationError(f"{dst}: exists and is not a directory; refusing to replace it")
    problem = output_problem(dst, "folder")
    if problem:
        raise DestinationError(f"{dst}: {problem}")
    _clean_up_after_killed_exports(dst)  # first: it may put back a dst that a killed export moved aside
    if dst.exists() and not force:
        raise DestinationError(f"{dst}: already exists; pass --force to replace it")
    if dst.exists() and not (dst / "config.json").is_file() and any(dst.iterdir()):
        raise DestinationError(
            f"{dst}: is a folder with files but no config.json, not an earlier export or model checkpoint; "
            "--force replaces only those, so that nothing else is deleted: remove it yourself or choose another path")
    if dst.resolve() in src_dir.resolve().parents:
        raise DestinationError(f"{dst}: the output directory contains the source model {src_dir}")
    dst.parent.mkdir(parents=True, exist_ok=True)

    existed, swapped = dst.exists(), False
    tmp = make_temp_dir(dst)
    try:
        with signals_raise():
            if existed:  # in place: the folder keeps its mode (who may read it)
                os.chmod(tmp, os.stat(dst).st_mode & 0o7777)
            for f in weights:
                _link_or_copy(f, tmp / f.name, link)
            for f in others:
                shutil.copy2(f, tmp / f.name)
            atomic_write_text(tmp / "config.json", json.dumps(new_config, indent=2, sort_keys=True) + "\n")
            fsync_dir(tmp)
            with signals_held():  # the two renames of a swap are never split by a signal
                _swap_into_place(tmp, dst)
                swapped = True
    except KeyboardInterrupt as e:
        shutil.rmtree(tmp, ignore_errors=True)
        state = ("the export was complete before it" if swapped else
                 f"{dst} is unchanged" if existed else f"{dst} was not created")
        raise ExportInterrupted(f"{state}; no temporary files are left") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------- helpers


def _read_config(path: Path, error: type[Exception] = ExportError) -> dict[str, Any]:
    return read_json_object(path, error, missing=f"not found (is {path.parent} a Hugging Face model directory?)",
                            what="a config.json file")


def _is_weight(p: Path) -> bool:
    return p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(WEIGHT_INDEX_SUFFIXES)


def _check_source(src: Path) -> tuple[dict[str, Any], list[Path], list[Path]]:
    """Parsed config, weight files and other files of a source checkpoint (or ExportError)."""
    if not src.exists():
        raise ExportError(f"{src}: source model directory not found")
    if not src.is_dir():
        raise ExportError(f"{src}: not a directory, expected a Hugging Face model directory")
    config = _read_config(src / "config.json")
    base_architecture(config, str(src / "config.json"))  # supported family?
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = [p for p in files if _is_weight(p)]
    others = [p for p in files if not _is_weight(p) and p.name != "config.json"]
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in weights):
        raise ExportError(f"{src}: no weight files (*.safetensors or *.bin) found")
    for index in (p for p in weights if p.name.endswith(WEIGHT_INDEX_SUFFIXES)):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            raise ExportError(f"{index}: not a valid weight index (expected a JSON object with 'weight_map')") from None
        missing = sorted({v for v in weight_map.values() if not (src / v).is_file()})
        if missing:
            raise ExportError(f"{index}: field 'weight_map' names missing shard(s): {', '.join(missing)}")
    return config, weights, others


def _load_allocation(allocation: Allocation | str | os.PathLike | Mapping[str, Any]) -> Allocation:
    if isinstance(allocation, Allocation):
        return allocation
    if isinstance(allocation, (str, os.PathLike)):
        return Allocation.load(allocation)
    if isinstance(allocation, Mapping):
        return Allocation.from_dict(dict(allocation), source="allocation")
    raise TypeError(f"allocation must be an Allocation, a path or a dict, got {type(allocation).__name__}")


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # EXDEV across filesystems, EPERM where links are not allowed
            pass
    shutil.copy2(src, dst)


def _clean_up_after_killed_exports(dst: Path) -> None:
    """Remove what an export to ``dst`` killed by SIGKILL left: its temporary copy, or an old ``dst``.

    An export killed between the two renames of a swap leaves the old ``dst`` moved aside
    and no ``dst``: that one is put back, as if the killed export had not started.
    """
    for path in remove_stale_temps(dst):
        warnings.warn(f"removed {path}, the temporary copy of an export that was killed", stacklevel=3)
    for path in stale_temps(dst, "consa-old"):
        if dst.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, dst)
            warnings.warn(f"restored {dst} from {path}, where an export killed while replacing it had "
                          "moved it", stacklevel=3)


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = make_temp_dir(dst, "consa-old")
    old.rmdir()  # only the unique name is wanted
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
