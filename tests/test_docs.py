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


# ------------------------------------------------------------------------------------------------------------------
# README's results table: every number comes from the result files its row links to

NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+")


def _numbers_in(files: list[Path]) -> list[float]:
    values: list[float] = []
    for file in files:
        values += [float(x) for x in NUMBER.findall(file.read_text(encoding="utf-8"))]
    return values


def results_rows() -> list[tuple[str, list[str], Path]]:
    """(row text, the numbers of its value cells, the result folder its last cell links to) of README's table."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(line) <= set("|-: ") or cells[0] == "setting":
            continue
        targets = LINK.findall(cells[-1])
        assert targets, f"README results row without a link to its result files: {line}"
        target = (REPO_ROOT / unquote(targets[0].split("#")[0])).resolve()
        folder = target if target.is_dir() else target.parent
        assert folder.is_relative_to(REPO_ROOT / "docs" / "results"), f"{line}: links outside docs/results/"
        numbers = [n for cell in cells[1:-1] for n in NUMBER.findall(CODE_SPAN.sub("", cell))]
        rows.append((line, numbers, folder))
    return rows


def test_every_readme_result_is_in_its_result_files() -> None:
    rows = results_rows()
    assert rows
    for line, numbers, folder in rows:
        values = _numbers_in(sorted(p for p in folder.rglob("*") if p.suffix in (".csv", ".json")))
        assert values, f"{folder}: no CSV or JSON result files"
        for number in numbers:
            digits = len(number.split(".")[1])
            assert any(f"{v:.{digits}f}" == number for v in values), \
                f"README: {number} (row {line[:60]}...) is in none of {folder}'s CSV / JSON files"
