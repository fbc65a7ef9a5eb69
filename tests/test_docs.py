"""Every relative link of the Markdown pages (README.md, docs/**/*.md) leads to an existing file and heading."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])

# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" may follow) or ")".
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, - and space stay),
    spaces become hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers: its headings (duplicates numbered as GitHub does) and explicit <a id=...>."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(text))
    for heading in HEADING.findall(text):
        slug = github_slug(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def test_the_slug_rule_on_github_examples() -> None:
    assert github_slug("The default run (`python run.py`)") == "the-default-run-python-runpy"
    assert github_slug("Zero-shot me5_small on full XQuAD-R") == "zero-shot-me5_small-on-full-xquad-r"
    assert github_slug("The paper's comparison: mono, cross") == "the-papers-comparison-mono-cross"


def test_the_link_pattern_finds_links_and_images_and_skips_code() -> None:
    text = "see [a](b.md#c) and ![img](results/x.png \"t\") but not `[x](y.md)`"
    assert LINK.findall(CODE_SPAN.sub("", text)) == ["b.md#c", "results/x.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.is_file()
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ... are not checked offline
            continue
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: {linked} does not exist")
        elif fragment and linked.suffix == ".md" and unquote(fragment) not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{fragment} in {linked.relative_to(REPO_ROOT)}")
        elif REPO_ROOT not in linked.parents and linked != REPO_ROOT:
            broken.append(f"{target}: leads outside the repository")
    assert not broken, f"{page.relative_to(REPO_ROOT)}:\n" + "\n".join(broken)
