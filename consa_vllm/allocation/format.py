"""The allocation file: which attention units are full (F) and which are sliding-window (S).

This module is the single definition of the file format (docs/DESIGN.md §3). The trainer
writes it, the CLI draws it, the exporter embeds it in ``config.json`` and the vLLM
plugin reads it. Everything else imports :class:`Allocation` from here.

Example::

    {"consa_version": 1, "granularity": "kv_head", "window": 4096,
     "pattern": ["SSSSSSSS", "FFSSSSFS"]}

Window semantics: a query at position ``i`` of an S head sees keys ``i-W+1 .. i`` (itself
included), the convention of ``sliding_window`` in HF transformers and vLLM, plus the first
``sink`` tokens of the sequence (attention sinks, StreamingLLM): keys ``0 .. sink-1`` and
``i-W+1 .. i``, causal. ``sink`` is optional and defaults to 0 (a plain sliding window); it is
written to the file only when nonzero, so files without sinks read and write exactly as before.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

FORMAT_VERSION = 1
FULL = "F"
SLIDING = "S"
#: The largest token count (window, ...) a file may hold. vLLM and the attention kernels
#: (FlashAttention, Triton) take windows and positions as 32-bit integers; a larger number
#: would only fail later, inside the running server.
MAX_TOKENS = 2**31 - 1

#: Bounds of the pattern, far above any model (the largest have ~100 layers, 128 KV heads):
#: a typo such as 100000 layers is refused before it allocates gigabytes.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024

#: A whole number of tokens: a JSON integer (the model is strict, so not a boolean, a
#: string or a float) in ``[1, MAX_TOKENS]``. Use it for every token-count field.
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


def _json_int(value: Any) -> Any:
    """Refuse booleans and floats before a ``Literal`` int compares them equal to 1 (True == 1.0 == 1)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected the JSON integer {FORMAT_VERSION}, got {describe_json(value)}")
    return value


class AllocationError(ValueError):
    """A bad allocation file or an allocation that does not fit a model.

    The message always names the file (when there is one) and the field at fault.
    """


class Allocation(BaseModel):
    """A validated F/S pattern: one string per layer, one character per KV head."""

    # strict: a JSON integer field takes only JSON integers ("64", 64.0 and true are refused),
    # a list only lists; every field added later gets the same treatment.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    consa_version: Annotated[Literal[1], BeforeValidator(_json_int)] = FORMAT_VERSION
    granularity: Literal["layer", "kv_head"]
    window: Tokens = Field(description="sliding window W in tokens (query i sees keys i-W+1..i)")
    pattern: list[str] = Field(max_length=MAX_LAYERS,
                               description="one string per layer; 'F' full, 'S' sliding, per KV head")
    sink: Annotated[int, Field(ge=0, le=MAX_TOKENS)] = Field(
        default=0, description="attention-sink tokens of every S head: it also sees keys 0..sink-1")

    @field_validator("pattern")
    @classmethod
    def _pattern_chars(cls, rows: list[str]) -> list[str]:
        if not rows:
            raise ValueError("pattern is empty: expected one string per layer")
        width = len(rows[0])
        if width > MAX_KV_HEADS:
            raise ValueError(f"layer 0 has {width} KV heads; at most {MAX_KV_HEADS} are allowed")
        for i, row in enumerate(rows):
            bad = sorted(set(row) - {FULL, SLIDING})
            if bad:
                raise ValueError(
                    f"layer {i} ({row!r}) has invalid character(s) {', '.join(map(repr, bad))}; "
                    f"only 'F' (full) and 'S' (sliding window) are allowed"
                )
            if len(row) == 0:
                raise ValueError(f"layer {i} is an empty string: expected one character per KV head")
            if len(row) != width:
                raise ValueError(
                    f"layer {i} has {len(row)} KV heads but layer 0 has {width}: "
                    "every layer must have the same number of KV heads"
                )
        return rows

    @field_validator("pattern")
    @classmethod
    def _layer_rows_uniform(cls, rows: list[str], info: ValidationInfo) -> list[str]:
        # A field validator (granularity is validated first), so the error names 'pattern'.
        if info.data.get("granularity") == "layer":
            for i, row in enumerate(rows):
                if len(set(row)) > 1:
                    raise ValueError(
                        f"layer {i} ({row!r}) mixes F and S, but granularity is 'layer': "
                        "every row must be all-F or all-S"
                    )
        return rows

    # ----------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def num_kv_heads(self) -> int:
        return len(self.pattern[0])

    def is_full(self, layer: int, kv_head: int) -> bool:
        return self.pattern[layer][kv_head] == FULL

    def full_heads(self, layer: int) -> list[int]:
        """Indices of the F KV heads of ``layer``, in ascending order."""
        return [h for h, c in enumerate(self.pattern[layer]) if c == FULL]

    def sliding_heads(self, layer: int) -> list[int]:
        """Indices of the S KV heads of ``layer``, in ascending order."""
        return [h for h, c in enumerate(self.pattern[layer]) if c == SLIDING]

    def mask(self) -> list[list[bool]]:
        """``mask[l][h]`` is True where the head is full attention."""
        return [[c == FULL for c in row] for row in self.pattern]

    @property
    def num_units(self) -> int:
        return self.num_layers if self.granularity == "layer" else self.num_layers * self.num_kv_heads

    @property
    def sparsity(self) -> float:
        """Fraction of units that are S (rho). Layer and head fractions agree by construction."""
        cells = self.num_layers * self.num_kv_heads
        return sum(row.count(SLIDING) for row in self.pattern) / cells

    def check_model(self, num_layers: int, num_kv_heads: int, source: str | os.PathLike | None = None) -> None:
        """Raise :class:`AllocationError` unless this allocation fits the model shape."""
        where = f"{source}: " if source else ""
        if self.num_layers != num_layers:
            raise AllocationError(
                f"{where}pattern has {self.num_layers} layers but the model has {num_layers} "
                "(num_hidden_layers)"
            )
        if self.num_kv_heads != num_kv_heads:
            raise AllocationError(
                f"{where}pattern has {self.num_kv_heads} KV heads per layer but the model has "
                f"{num_kv_heads} (num_key_value_heads)"
            )

    # ------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike | None = None) -> "Allocation":
        """Validate a parsed JSON object; errors name ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise AllocationError(_explain(e, source)) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Allocation":
        """Read and validate an allocation file."""
        p = Path(path)
        data = read_json_object(p, AllocationError, missing="allocation file not found",
                                what="an allocation JSON file", unique_keys=True)
        return cls.from_dict(data, source=p)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object. ``sink`` is left out when 0 (its default), so an allocation
        without sinks has the same dict, file and exported ``config.json`` as before sinks existed."""
        return self.model_dump(mode="json", exclude={"sink"} if self.sink == 0 else None)

    def to_json(self) -> str:
        """Human-readable JSON: fixed fields first, one pattern row per line."""
        d = self.to_dict()
        head = {k: d.pop(k) for k in ("consa_version", "granularity", "window", "sink") if k in d}
        rows = d.pop("pattern")
        parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        parts.append('  "pattern": [\n' + ",\n".join(f"    {json.dumps(r)}" for r in rows) + "\n  ]")
        parts += [f"  {json.dumps(k)}: {json.dumps(v, indent=2).replace(chr(10), chr(10) + '  ')}" for k, v in d.items()]
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written file."""
        p = Path(path)
        atomic_write_text(p, self.to_json())
        return p

    def with_extra(self, **fields: Any) -> "Allocation":
        """A copy with extra (provenance) fields added or replaced."""
        return type(self).model_validate({**self.to_dict(), **fields})


def read_json_object(path: Path, error: type[Exception] = ValueError, missing: str = "not found",
                     what: str = "a JSON file", unique_keys: bool = False) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; every failure is one ``error`` naming ``path``.

    The one reader of the project's JSON inputs (allocation files, ``config.json``), so a bad
    file reads the same wherever it is given. A UTF-8 byte-order mark is accepted. With
    ``unique_keys`` a key given twice in one object is refused (plain JSON parsing silently
    keeps the last one, so ``{"window": 64, "window": 4096}`` would serve 4096).
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {missing}")
    if path.is_dir():
        raise error(f"{path}: is a directory, expected {what}")
    try:
        # utf-8-sig: editors on Windows save a BOM, which json.loads refuses.
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except _DuplicateKey as e:
        raise error(f"{path}: field '{e.key}' is given twice in one JSON object; keep one") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file, expected {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {describe_json(data)}")
    return data


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and a rename.

    The file gets the mode any new file gets (0666 less the umask), or keeps the mode of
    the file it replaces: not the 0600 of a ``mkstemp`` file, which another user (a vLLM
    container) could not read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path)
    try:
        if path.is_file():
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temp_file(path: Path) -> tuple[int, str]:
    """An exclusive new file beside ``path``, created with mode 0666 so that the umask applies."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary file name")  # pragma: no cover


def describe_json(value: Any) -> str:
    """A value as it reads in JSON, with its JSON type (JSON's names, not Python's):
    ``"64" (a string)``, ``true (a boolean)``, ``[1, 2] (an array)``, ``null``."""
    kind = ("a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str)
            else "not a finite number" if isinstance(value, float) and not math.isfinite(value)
            else "a number with a fraction or exponent" if isinstance(value, float)
            else "an array" if isinstance(value, list) else "an object" if isinstance(value, dict)
            else "null" if value is None else "a number")
    try:
        text = json.dumps(value)
    except ValueError:  # NaN/Infinity with allow_nan=False never happens here; be safe
        text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return text if value is None else f"{text} ({kind})"


def _explain(e: ValidationError, source: str | os.PathLike | None) -> str:
    where = f"{source}: " if source else ""
    msgs = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "allocation"
        name = str(err["loc"][-1]) if err["loc"] else "value"
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "missing":
            msg = "required field is missing"
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            msg = f"expected a JSON integer (a whole number without quotes), got {describe_json(value)}"
        elif kind in ("string_type", "list_type"):
            msg = f"expected {'a JSON string' if kind == 'string_type' else 'a JSON list'}, got {describe_json(value)}"
        elif kind == "too_long":
            msg = f"{ctx.get('actual_length')} layers; at most {ctx.get('max_length')} are allowed"
        elif kind == "greater_than_equal":
            msg = f"{name} must be >= {ctx['ge']}, got {value}"
        elif kind == "less_than_equal":
            why = (" (vLLM and its attention kernels hold token counts as 32-bit integers)"
                   if ctx["le"] == MAX_TOKENS else "")
            msg = f"{name} must be <= {ctx['le']}{why}, got {value}"
        elif kind == "literal_error" and loc == "consa_version":
            msg = f"got {value!r}, but this consa-vllm reads allocation format version {FORMAT_VERSION}"
        elif kind == "literal_error":
            msg = f"{msg} (got {value!r})"
        msgs.append(f"field '{loc}': {msg}")
    return where + "invalid allocation: " + "; ".join(msgs)
