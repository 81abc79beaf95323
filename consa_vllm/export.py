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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

from .allocation.format import Allocation, AllocationError, atomic_write_text, read_json_object
from . import families
from .allocation.shape import ModelShape

CONFIG_KEY = "consa"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


class ExportError(ValueError):
    """The export cannot be done; the message names the file and the field at fault."""


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
        raise AllocationError(f"{where}: field '{CONFIG_KEY}' must be a JSON object, got {type(raw).__name__}")
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


def exported_config(config: Mapping[str, Any], allocation: Allocation, where: str = "config.json") -> dict[str, Any]:
    """The ``config.json`` of the exported checkpoint (pure: no I/O)."""
    base = base_architecture(config, where)
    shape = ModelShape.from_config(dict(config))
    allocation.check_model(shape.num_layers, shape.num_kv_heads)
    out = dict(config)
    notes: dict[str, Any] = {}

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
    out[CONFIG_KEY] = {**allocation.to_dict(), "base_architecture": base, **notes}
    return out


def export_model(
    src: str | os.PathLike,
    allocation: Allocation | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    link: bool = True,
    force: bool = False,
) -> Path:
    """Write ``out_dir``: ``src`` with ``allocation`` embedded, servable by the consa plugin.

    ``link=True`` hard-links the weight files (falling back to a copy where the filesystem
    cannot link), ``link=False`` copies them. An existing ``out_dir`` is refused unless
    ``force``. ``src`` may itself be an exported ConSA checkpoint (re-export with a new
    allocation; ``src == out_dir`` with ``force`` works too). Returns ``out_dir``.

    All checks run before anything is written; ``out_dir`` is never left half-written.
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
    new_config = exported_config(config, alloc, where=str(cfg_path))

    if dst.exists() or dst.is_symlink():
        if not force:
            raise ExportError(f"{dst}: already exists; pass --force (force=True) to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise ExportError(f"{dst}: exists and is not a directory; refusing to replace it")
    if dst.resolve() in src_dir.resolve().parents:
        raise ExportError(f"{dst}: the output directory contains the source model {src_dir}")
    dst.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.consa-tmp-", dir=dst.parent))
    try:
        for f in weights:
            _link_or_copy(f, tmp / f.name, link)
        for f in others:
            shutil.copy2(f, tmp / f.name)
        atomic_write_text(tmp / "config.json", json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        _swap_into_place(tmp, dst)
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


def _fsync_dir(path: Path) -> None:
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


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.consa-old-", dir=dst.parent))
    old.rmdir()  # only the unique name is wanted
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
