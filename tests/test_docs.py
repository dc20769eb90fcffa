"""The documentation names only repository paths that exist.

Every path a doc names -- in a Markdown link, in inline code or in a fenced code block -- is
checked against the working tree when it looks like a repository path: its first segment is a
top-level entry of the repository (``icakd_fast/...``, ``benchmarks/...``, ``setup.py``) or, for
a doc outside the root, an entry of the doc's own folder (``results/...`` in
``benchmarks/README.md``). Shell globs (``e2e_H200.*``) and placeholders (``csrc/<op>.cpp``) must
match at least one file. Paths that only exist once something has run are allowed by prefix
(``ALLOWED_PREFIXES``).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: paths created at run time (outputs, caches, build products), never committed
ALLOWED_PREFIXES = (
    "runs/",
    "build/",
    "dist/",
    ".whl/",
    ".venv/",
    "icakd_fast/_C",
    "icakd_fast/_build_info.json",
    "benchmarks/results/cpu-ops.json",
)


def doc_files() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
    docs += sorted((ROOT / "docs").glob("*.md"))
    return [p for p in docs if p.exists()]


def _top_level(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name not in (".git", "__pycache__")}


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1\s*$", re.S | re.M)
_INLINE = re.compile(r"(`+)(.+?)\1", re.S)
_STRIP = "\"'`,;:()[]{}.!?"


def _path_tokens(text: str) -> list[str]:
    out = []
    for raw in text.split():
        tok = raw.strip(_STRIP)
        tok = re.sub(r"(:\d+(-\d+)?|::\w+)$", "", tok)  # file:line, file::name
        tok = tok.split("=", 1)[1] if tok.startswith("--") and "=" in tok else tok
        if tok and ("/" in tok or "." in tok) and "://" not in tok:
            out.append(tok)
    return out


def referenced_paths(doc: Path) -> list[tuple[str, str]]:
    """``(kind, path)`` for every link target and every path-like word of code in ``doc``."""
    text = doc.read_text(encoding="utf-8")
    found = []
    for m in _LINK.finditer(text):
        target = m.group(1).split("#", 1)[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            found.append(("link", target))
    fences = list(_FENCE.finditer(text))
    for m in fences:
        found += [("code", t) for t in _path_tokens(m.group(2))]
    rest = _FENCE.sub("", text)
    for m in _INLINE.finditer(rest):
        found += [("code", t) for t in _path_tokens(m.group(2))]
    return found


def _exists(path: str, base: Path) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", path)
    full = str(base / pattern)
    if any(c in pattern for c in "*?["):
        return bool(glob.glob(full))
    # an output prefix (``--out benchmarks/results/cpp_cpu`` writes cpp_cpu.json, cpp_cpu.md)
    return os.path.exists(full) or bool(glob.glob(glob.escape(full) + ".*"))


def missing_paths(doc: Path, root: Path = ROOT) -> list[str]:
    """The paths ``doc`` names that do not exist (relative to ``root`` or to the doc's folder)."""
    top, here = _top_level(root), _top_level(doc.parent)
    bad = []
    for kind, path in referenced_paths(doc):
        if path.startswith(("/", "~", "$")):
            continue
        clean = path[2:] if path.startswith("./") else path
        if kind == "link":
            if not _exists(clean, doc.parent):
                bad.append(path)
            continue
        first = clean.split("/", 1)[0]
        if first not in top and first not in here:
            continue
        if clean.startswith(ALLOWED_PREFIXES):
            continue
        if not (_exists(clean, root) or _exists(clean, doc.parent)):
            bad.append(path)
    return sorted(set(bad))


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_names_only_existing_paths(doc):
    bad = missing_paths(doc)
    assert not bad, f"{doc.relative_to(ROOT)} names paths that do not exist: {bad}"


def test_checker_catches_a_missing_path(tmp_path):
    """The checker itself, on a small made-up repository: made-up paths fail; existing ones,
    globs, placeholders, file:line and run-time paths pass."""
    for rel in ("icakd_fast/loss.py", "benchmarks/results/e2e_H200.csv", "csrc/cam.cpp", "docs/a.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    doc = tmp_path / "docs" / "b.md"
    doc.write_text(
        "See `icakd_fast/_no_such_module.py`, [t](../tests/no_such_test.py), `icakd_fast/loss.py:12`,\n"
        "[a](a.md), `benchmarks/results/e2e_H200.*`, `csrc/<op>.cpp`, `runs/demo/summary.json`\n"
        "and `results/x.md / 2` (not a repository path).\n"
        "```bash\npython benchmarks/no_such_bench.py --out DIR\n```\n",
        encoding="utf-8",
    )
    bad = missing_paths(doc, tmp_path)
    assert bad == ["../tests/no_such_test.py", "benchmarks/no_such_bench.py", "icakd_fast/_no_such_module.py"]


def test_every_doc_is_checked():
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    assert "README.md" in names and "docs/DESIGN.md" in names


def test_readme_stays_a_short_users_page():
    """Run-by-run figures and the status journal live in docs/performance.md and docs/status.md."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move details to docs/"
