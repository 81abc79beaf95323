"""The testbed corpus: Python source files of the running interpreter's stdlib and installed packages.

Every file is recorded (path, SHA-256, bytes, split) in ``manifest.json``; the split is a
function of the file's hash, so the same installation always gives the same train/held-out
split. Texts go to ``train.jsonl`` and ``heldout.jsonl`` (``{"text": ...}`` lines, which the
trainer and ``consa-vllm eval`` read).
"""

from __future__ import annotations

import hashlib
import json
import site
import sys
import sysconfig
from pathlib import Path

from pydantic import BaseModel


class CorpusFile(BaseModel):
    path: str
    sha256: str
    bytes: int
    split: str  # "train" or "heldout"


class CorpusManifest(BaseModel):
    """``manifest.json``: which files make the corpus, and the interpreter they came from."""

    python: str
    roots: list[str]
    max_bytes: int
    heldout_per_mille: int
    files: list[CorpusFile]


def source_roots() -> list[Path]:
    """The stdlib and site-packages folders of this interpreter (deduplicated, existing)."""
    paths = sysconfig.get_paths()
    cands = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    out: list[Path] = []
    for c in cands:
        p = Path(c).resolve()
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def python_files(roots: list[Path], max_file_bytes: int = 512_000) -> list[Path]:
    """Every ``*.py`` under ``roots`` (no ``__pycache__``, no file over ``max_file_bytes``), sorted."""
    seen: set[Path] = set()
    files: list[Path] = []
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            r = f.resolve()
            if r in seen or "__pycache__" in f.parts or not f.is_file():
                continue
            seen.add(r)
            try:
                if f.stat().st_size <= max_file_bytes:
                    files.append(f)
            except OSError:
                continue
    return files


def build_corpus(out_dir: Path, max_bytes: int, heldout_per_mille: int = 20,
                 roots: list[Path] | None = None, max_files: int | None = None) -> CorpusManifest:
    """Write ``manifest.json``, ``train.jsonl`` and ``heldout.jsonl`` to ``out_dir`` (at most ``max_bytes`` of text).

    Files are taken in the order of their SHA-256 (a stable, content-defined shuffle) until
    ``max_bytes`` is reached; a file whose hash is below ``heldout_per_mille`` / 1000 is held out.
    """
    roots = roots or source_roots()
    entries = []
    for f in python_files(roots):
        try:
            data = f.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        entries.append((hashlib.sha256(data).hexdigest(), f, data))
    entries.sort(key=lambda e: e[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    files, total, seen_hashes = [], 0, set()
    with open(out_dir / "train.jsonl", "w") as tr, open(out_dir / "heldout.jsonl", "w") as ho:
        for digest, f, data in entries:
            if digest in seen_hashes:  # identical copies (vendored files) once
                continue
            if total + len(data) > max_bytes or (max_files and len(files) >= max_files):
                break
            seen_hashes.add(digest)
            split = "heldout" if int(digest[:8], 16) % 1000 < heldout_per_mille else "train"
            (ho if split == "heldout" else tr).write(json.dumps({"text": data.decode("utf-8")}) + "\n")
            files.append(CorpusFile(path=str(f), sha256=digest, bytes=len(data), split=split))
            total += len(data)
    manifest = CorpusManifest(python=sys.version, roots=[str(r) for r in roots], max_bytes=max_bytes,
                              heldout_per_mille=heldout_per_mille, files=files)
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1) + "\n")
    return manifest


def read_texts(path: Path, limit_bytes: int | None = None) -> list[str]:
    """The texts of a ``{"text": ...}`` JSON-lines file (stopping after ``limit_bytes`` characters)."""
    out, n = [], 0
    with open(path) as f:
        for line in f:
            t = json.loads(line)["text"]
            out.append(t)
            n += len(t)
            if limit_bytes and n >= limit_bytes:
                break
    return out
