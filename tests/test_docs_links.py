"""The README and the pages under docs/: every relative link points at something that exists,
the README stays short, and it links to every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

# [text](target) or [text](target "title"); the target stops at whitespace or ")"
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links live."""
    kept: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            kept.append(CODE_SPAN.sub("", line))
    return "\n".join(kept)


def is_relative(target: str) -> bool:
    """A path to a file or folder: not a URL or mail address, not an anchor of this page."""
    return not target.startswith((*EXTERNAL, "#"))


def relative_links(path: Path) -> list[str]:
    """Every link target of ``path`` that names a file or folder: not a URL, not a bare
    ``#anchor``."""
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8"))) if is_relative(t)]


def resolve(path: Path, target: str) -> Path:
    """The file or folder ``target`` names, relative to the file that holds the link."""
    return (path.parent / target.split("#", 1)[0]).resolve()


def broken_links(path: Path) -> list[str]:
    return [t for t in relative_links(path) if not resolve(path, t).exists()]


def test_there_are_docs_pages() -> None:
    assert README.is_file()
    assert list(DOCS.glob("*.md")), "docs/ holds no page"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path: Path) -> None:
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)} links to missing paths: {broken}"


def test_the_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines, not under {README_MAX_LINES}"


def test_the_readme_links_to_every_docs_page() -> None:
    linked = {resolve(README, t) for t in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    missing = [p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link to: {missing}"


def test_the_link_pattern_finds_what_it_should() -> None:
    text = (
        "[a](docs/a.md) [b](docs/b.md#part) [c](https://example.org) [d](#top)"
        ' [e](mailto:x@y.z) [f](../g/ "title")\n```\n[h](inside/a/fence.md)\n```\n`[i](span.md)`'
    )
    targets = [t for t in LINK.findall(prose(text)) if is_relative(t)]
    assert targets == ["docs/a.md", "docs/b.md#part", "../g/"]


def test_the_layout_page_names_every_module_of_the_driver() -> None:
    # docs/layout.md's tree has one line per module of train_evaluate/: a module added or
    # renamed without its line is a layout the page no longer shows
    tree = (DOCS / "layout.md").read_text()
    listed = set(re.findall(r"^\s+(\w+\.py)\b", tree, flags=re.M))
    modules = {p.name for p in (ROOT / "train_evaluate").rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set()
