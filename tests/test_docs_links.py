"""The project's docs stand alone: every relative link in README.md and docs/*.md resolves to a
file inside the repository (and to a heading, for ``#anchor`` links), and none cites material
that lives outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import REPO, anchors, without_code

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    return LINK.findall(without_code(page.read_text()))


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target))  # https:, mailto:, ...


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    found = links(page)
    broken = []
    for target in found:
        if is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor:
            if resolved.suffix != ".md":
                broken.append(f"{target}: anchor into a non-Markdown file")
            elif anchor not in anchors(resolved.read_text()):
                broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_cite_nothing_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert "../shared" not in text
    assert not re.search(r"\bSPEC\b", text), "cites an outside contract"
    assert not re.search(r"\bLESSONS\b", text)


def test_the_checker_sees_links_and_broken_ones(tmp_path: Path) -> None:
    # The checker itself: a link in prose counts, one in a code block does not.
    text = "see [a](docs/x.md#y) and `[b](nope.md)`\n```\n[c](gone.md)\n```\n"
    assert LINK.findall(without_code(text)) == ["docs/x.md#y"]
    assert anchors("# 1. Connecting\n## Admin API and `relay status`\n## Routes\n## Routes\n") == {
        "1-connecting", "admin-api-and-relay-status", "routes", "routes-1"}
    assert len(links(REPO / "README.md")) >= 10
