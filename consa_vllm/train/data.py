"""Training data: read documents, tokenize, pack into fixed-length sequences, order by (seed, step).

Sources: text files (any extension given explicitly; .txt/.md/.rst/.py/... inside folders),
``.jsonl``/``.json`` lines and ``.parquet`` files (``--text-field``), and folders written by
``datasets``' ``save_to_disk``. Documents are joined with the EOS token and cut into
``seq_len`` tokens. The order is a pure function of the seed and the global sample index,
so a resumed run, or a run split over ranks, sees exactly the same sequences.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from .config import DataError

TEXT_EXTS = {".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".rs", ".go", ".java", ".js", ".ts",
             ".html", ".tex", ".csv", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".sh"}
JSONL_EXTS = {".jsonl", ".json"}
PARQUET_EXTS = {".parquet"}


def _is_saved_dataset(p: Path) -> bool:
    """Whether ``p`` is a folder written by ``datasets``' ``save_to_disk``.

    The same test as ``datasets.load_from_disk``: a ``Dataset`` folder has both
    ``dataset_info.json`` and ``state.json``, a ``DatasetDict`` folder ``dataset_dict.json``.
    ``state.json`` alone is no sign: the trainer's own checkpoint folders have one.
    """
    if not p.is_dir():
        return False
    dataset = (p / "dataset_info.json").is_file() and (p / "state.json").is_file()
    return dataset or (p / "dataset_dict.json").is_file()


def list_sources(paths: list[str]) -> list[tuple[str, Path]]:
    """Expand files and folders into ``(kind, path)`` pairs in a stable order."""
    out: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"--data {raw}: no such file or directory")
        if _is_saved_dataset(p):
            out.append(("datasets", p))
        elif p.is_dir():
            found = []
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if not f.is_file() or any(x.startswith(".") or x == "__pycache__" for x in rel):
                    continue
                ext = f.suffix.lower()
                if ext in JSONL_EXTS:
                    found.append(("jsonl", f))
                elif ext in PARQUET_EXTS:
                    found.append(("parquet", f))
                elif ext in TEXT_EXTS:
                    found.append(("text", f))
            if not found:
                raise DataError(f"--data {raw}: folder has no readable data files (looked for "
                                f"{', '.join(sorted(TEXT_EXTS | JSONL_EXTS | PARQUET_EXTS))})")
            out += found
        else:
            ext = p.suffix.lower()
            out.append(("jsonl" if ext in JSONL_EXTS else "parquet" if ext in PARQUET_EXTS else "text", p))
    return out


def iter_documents(sources: list[tuple[str, Path]], text_field: str = "text") -> Iterator[str]:
    """Yield document texts; raise :class:`DataError` naming the file for anything unreadable."""
    for kind, p in sources:
        if kind == "text":
            try:
                yield p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"--data {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise DataError(f"--data {p}: cannot read ({e.strerror})") from None
        elif kind == "jsonl":
            yield from _iter_jsonl(p, text_field)
        elif kind == "parquet":
            yield from _iter_parquet(p, text_field)
        else:
            yield from _iter_saved_dataset(p, text_field)


def _iter_jsonl(p: Path, text_field: str) -> Iterator[str]:
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"--data {p}: cannot read as UTF-8 JSON lines ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--data {p}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise DataError(f"--data {p}: line {i} has no string field {text_field!r} (set --text-field)")
        yield rec[text_field]


def _iter_parquet(p: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(p)
    except ImportError:
        raise DataError(f"--data {p}: reading parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"--data {p}: not a readable parquet file ({e})") from None
    if text_field not in table.column_names:
        raise DataError(f"--data {p}: no column {text_field!r} (columns: {', '.join(table.column_names)}; "
                        "set --text-field)")
    for v in table.column(text_field).to_pylist():
        if isinstance(v, str):
            yield v


def _iter_saved_dataset(p: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
        ds = datasets.load_from_disk(str(p))
    except ImportError:
        raise DataError(f"--data {p}: reading a saved dataset needs the datasets package") from None
    except Exception as e:
        raise DataError(f"--data {p}: not a readable datasets.save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"--data {p}: no column {text_field!r} (columns: {', '.join(ds.column_names)}; "
                        "set --text-field)")
    for v in ds[text_field]:
        if isinstance(v, str):
            yield v


def tokenize_and_pack(docs: Iterator[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """All documents, EOS-separated, cut into ``[num_sequences, seq_len]`` (remainder dropped)."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
        batch.clear()

    for doc in docs:
        if doc:
            batch.append(doc)
        if len(batch) >= 64:
            flush()
        if max_tokens is not None and len(buf) >= max_tokens:
            break
    if batch and (max_tokens is None or len(buf) < max_tokens):
        flush()
    if max_tokens is not None:
        buf = buf[:max_tokens]
    n = len(buf) // seq_len
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)


class PackedData:
    """Packed sequences served in an order that is a function of (seed, global sample index).

    Epoch ``e`` visits the sequences in ``randperm(N, seed=(seed, e))`` order. The micro-batch
    ``m`` of step ``s`` on rank ``r`` takes global samples
    ``((s * accum + m) * world + r) * batch .. + batch`` so that 1 rank with ``accum * k``
    micro-batches and ``k`` ranks with ``accum`` each see the same sequences per step.
    """

    def __init__(self, sequences: torch.Tensor, seed: int, sha256: str | None = None):
        self.sequences = sequences
        self.seed = seed
        self.sha256 = sha256  # of the documents read (provenance without the data's paths)
        self._perm_epoch = -1
        self._perm = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self), generator=g), epoch
        return self._perm

    def sample_indices(self, start: int, count: int) -> list[int]:
        n = len(self)
        return [int(self._perm_for(i // n)[i % n]) for i in range(start, start + count)]

    def micro_batch(self, step: int, micro: int, grad_accum: int, batch_size: int,
                    rank: int = 0, world: int = 1) -> torch.Tensor:
        start = ((step * grad_accum + micro) * world + rank) * batch_size
        return self.sequences[self.sample_indices(start, batch_size)]


def load_data(paths: list[str], tokenizer, seq_len: int, seed: int, text_field: str = "text",
              max_tokens: int | None = None) -> PackedData:
    """Read, tokenize and pack; raise :class:`DataError` with one clear message if unusable."""
    sources = list_sources(paths)
    digest = hashlib.sha256()

    def hashed(docs: Iterator[str]) -> Iterator[str]:
        for doc in docs:  # what was read, in reading order, NUL-separated
            digest.update(doc.encode("utf-8", "surrogatepass") + b"\0")
            yield doc

    seqs = tokenize_and_pack(hashed(iter_documents(sources, text_field)), tokenizer, seq_len, max_tokens)
    if seqs.shape[0] == 0:
        raise DataError(f"--data {' '.join(paths)}: not enough text for one sequence of --seq-len {seq_len} tokens")
    return PackedData(seqs, seed, digest.hexdigest())
