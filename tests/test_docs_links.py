"""The project's Markdown links resolve: every relative link names a file or folder of the
repository, and every ``#anchor`` names a heading of its target (GitHub's heading slugs).

README.md links each section of docs/RESULTS.md by anchor, so a renamed heading there must
fail here rather than leave a dead link for users.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/DESIGN.md", "docs/RESULTS.md", "docs/bad-input.md", "benchmarks/README.md",
        "deploy/README.md"]
# [text](target): the target up to the first closing parenthesis or space (no nested parentheses
# in this project's links); images and bare URLs alike.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks or inline code (brackets there are not links)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation other than ``-`` and
    ``_`` dropped, each space a ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (duplicates get GitHub's ``-1``, ``-2`` ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m[1])
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def test_github_slug():
    assert github_slug("GPU calibrated parity (H200, bf16, torch.compile + CUDA graphs)") == \
        "gpu-calibrated-parity-h200-bf16-torchcompile--cuda-graphs"
    assert github_slug("DuoAttention's 50% pattern") == "duoattentions-50-pattern"
    assert github_slug("The split threshold by max_model_len") == "the-split-threshold-by-max_model_len"


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    path = ROOT / doc
    bad = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{doc}: dead links: {bad}"
