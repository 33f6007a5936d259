"""The documentation's relative links resolve inside the repository: files, folders and anchors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercase, punctuation dropped, spaces to '-',
    repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_code_fences_are_closed(page):
    """An unclosed fence turns the rest of the page into code, its headings (and anchors) too."""
    fences = [line for line in page.read_text().splitlines() if re.match(r"\s*(```|~~~)", line)]
    assert len(fences) % 2 == 0, f"{page.relative_to(REPO)}: {len(fences)} fence lines"


def test_the_docs_exist_and_the_readme_is_short():
    assert (REPO / "docs").is_dir() and len(PAGES) > 2
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or REPO not in (dest, *dest.parents):
            bad.append(f"{target}: no such file in the repository")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def test_the_link_check_sees_broken_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A title, with `code`\n[x](#a-title-with-code) [y](nope.md) ![img](p.md)\n```\n[z](in-fence.md)\n```\n")
    assert links(page) == ["#a-title-with-code", "nope.md", "p.md"]
    assert anchors(page) == {"a-title-with-code"}


def test_every_config_key_has_a_row_on_the_training_page():
    """docs/training.md's key table names every key of the config tree, and no other."""
    import dataclasses

    from fastsd.config import TrainConfig

    def keys(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    page = (REPO / "docs" / "training.md").read_text()
    table = page.split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([\w.]+)` \|", table, re.M))
    assert rows == set(keys(TrainConfig()))


def test_the_layout_page_names_every_module():
    page = (REPO / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in (REPO / "fastsd").rglob("*.py")
               if p.name != "__init__.py" and not re.search(rf"^\s+{re.escape(p.name)}\s", page, re.M)]
    assert not missing
